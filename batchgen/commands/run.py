"""``batchgen run``: check, lock, resume from the journal, answer, write; the exit code."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from batchgen import __version__
from batchgen.batch.mode import BatchRun, BatchSettings, Hold, held_rows
from batchgen.batch.remote import BatchAPI
from batchgen.batch.store import COLLECTED, BatchStore, read_held_keys, refuse_forgetting
from batchgen.budget import Budget
from batchgen.commands.dryrun import dry_run
from batchgen.commands.outputs import beside, keep_other_request_set, remove_superseded, signals_deferred
from batchgen.commands.prepare import (
    Prepared,
    batch_speed,
    budget_for,
    prepare,
    price_region,
    prices_for,
    server_for_run,
)
from batchgen.commands.summary import RunSummary
from batchgen.config import RunConfig
from batchgen.errors import BatchgenError, FatalAPIError, UsageError
from batchgen.journal import Journal, LockedError, journal_path
from batchgen.logs import event
from batchgen.options import RunOptions
from batchgen.planning import plan_resume
from batchgen.pool import RunControl
from batchgen.pricing import PriceTable
from batchgen.progress import JsonProgress, Progress, summary_line
from batchgen.results import RunResult, exit_code
from batchgen.runner import arun_batches
from batchgen.tables import TableWriter, check_writable

log = logging.getLogger("batchgen")


def run_command(options: RunOptions) -> int:
    summary = RunSummary(options, datetime.now(UTC))
    try:
        code = _run(options, summary)
    except LockedError:
        raise  # the summary belongs to the run holding the lock: leave it alone
    except BatchgenError as err:
        summary.write(exit_code=err.exit_code, error=str(err))
        raise
    summary.write(exit_code=code)
    return code


def _run(options: RunOptions, summary: RunSummary) -> int:
    prepared = prepare(options)
    prices = prices_for(options)
    budget = budget_for(options, prices, prepared.parameters)
    if options.policy.dry_run:
        return dry_run(prepared, prices)
    output = options.output.output_path
    check_writable(output)
    created = not journal_path(output).exists()
    with Journal(journal_path(output)) as journal:
        journal.lock(output)
        try:
            return _LockedRun(prepared, journal, prices, budget, summary).run()
        except UsageError:
            if created:  # refused before any row was recorded: leave no journal or lock behind
                journal.remove_if_empty()
            raise


class _LockedRun:
    """One run holding the output's lock: answer every row, then put the table in place."""

    def __init__(
        self,
        prepared: Prepared,
        journal: Journal,
        prices: PriceTable | None,
        budget: Budget | None,
        summary: RunSummary,
    ) -> None:
        self.prepared, self.options = prepared, prepared.options
        self.journal, self.prices, self.budget, self.summary = journal, prices, budget, summary
        self.output = self.options.output.output_path
        self.metadata = {
            "batchgen_version": __version__,
            "run_id": summary.run_id,
            "model": self.options.server.model,
            "job": self.options.output.job or "",
            "region": price_region(self.options),
            "prices_version": prices.version if prices else "",
            "input": str(Path(self.options.input.input_path).resolve()),
            "rows": str(prepared.source.total),
            "endpoint": self.options.server.answered_by,
        }

    def run(self) -> int:
        self.journal.clean_leftovers(self.output)
        if self.options.policy.fresh:
            refuse_forgetting(self.output, self.journal.path)
            self.journal.discard()
        self.journal.open()
        writer = TableWriter(self.output.parent, self.output.name, self.prepared.output_format, self.metadata)  # type: ignore[arg-type]
        try:
            result, target, replaced = self._answer_and_write(writer)
        except (OSError, pl.exceptions.PolarsError) as exc:
            writer.discard()
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
            raise BatchgenError(
                f"could not write {self.output} ({reason}); every answer is kept in "
                f"{self.journal.path}: fix that and run the same command again to "
                "write it (nothing is sent twice)"
            ) from None
        except BaseException:
            writer.discard()
            raise
        self.summary.output = target
        self._report(result, target, replaced)
        return exit_code(result)

    def _answer_and_write(self, writer: TableWriter) -> tuple[RunResult, Path, tuple[Path, str] | None]:
        with server_for_run(self.prepared) as config:
            if self.options.pacing.engine == "ray":
                self._on_ray(config)
            self._say_resume(config)
            result = asyncio.run(self._with_signals(config, writer))
        self.summary.result = result
        target = self.output
        # Batch mode's output is the journal's state, whatever it holds (all pending, all refused).
        answered = result.stats.ok > 0 or self.options.batch.batch or result.stats.pending > 0
        finished = result.fatal is None and result.stopped is None and answered
        if self.output.exists() and not finished:
            # A stopped, refused or all-failed run never replaces earlier answers.
            target = beside(self.output, "partial")
        replaced = None
        # A signal now would leave no output for answers already paid: hold it until the
        # table is in place (it is delivered, and honoured, right after).
        with signals_deferred():
            if target == self.output:
                replaced = keep_other_request_set(self.output, self.metadata)
            writer.commit(target)
            if target == self.output and not self.options.policy.fresh:  # --fresh: the journal forgot them
                remove_superseded(self.output, self.metadata)
        return result, target, replaced

    def _on_ray(self, config: RunConfig) -> None:
        """--engine ray: the rows still to answer go to Ray actors first (``commands.rayrun``)."""
        from batchgen.commands.rayrun import run_on_ray

        pacing, journal_dir = self.options.pacing, self.options.pacing.journal_dir
        run_on_ray(
            self.prepared.source, config, self.prepared.spec, self.journal, output=self.output,
            journal_dir=Path(journal_dir) if journal_dir else None, address=pacing.ray_address,
            actors=pacing.ray_actors, id_column=self.options.input.id_column,
            endpoint=self.metadata["endpoint"], retry_errors=self.options.policy.retry_errors,
        )  # fmt: skip

    def _say_resume(self, config: RunConfig) -> None:
        if self.options.batch.batch:  # batch mode says what it does
            return
        held = read_held_keys(self.journal.path)
        if not held and not self.journal.has_rows():
            return
        plan = plan_resume(
            self.prepared.source.batches(), config, self.prepared.spec,
            id_column=self.options.input.id_column, endpoint=self.metadata["endpoint"],
            lookup=self.journal.lookup, retry_errors=self.options.policy.retry_errors,
            held=held,
        )  # fmt: skip
        log.info("%s", plan.line())

    async def _with_signals(self, config: RunConfig, writer: TableWriter) -> RunResult:
        """The run, with SIGINT/SIGTERM stopping it gracefully and a second signal at once."""
        loop = asyncio.get_running_loop()
        control = RunControl()
        grace = self.options.policy.grace
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, _on_signal, control, sig.name, grace, self.options.batch.batch)
        try:
            hold, fatal = None, None
            started = time.monotonic()
            if self.options.batch.batch:
                hold, fatal = await self._batch_pass(config, control)
            else:
                hold = self._held_by_batches()
            source = self.prepared.source
            result = await arun_batches(
                source.batches(), source.total, config, self.prepared.spec, write=writer.write,
                id_column=self.options.input.id_column, endpoint=self.metadata["endpoint"],
                journal=self.journal, retry_errors=self.options.policy.retry_errors, control=control,
                prices=self.prices, budget=self.budget, progress=self._progress(), hold=hold,
            )  # fmt: skip
            if fatal is not None and result.fatal is None:
                result.fatal, fatal.result = fatal, result
            result.stats.started = started  # the summary's time includes the batch pass
            return result
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _held_by_batches(self) -> Hold | None:
        """Rows in batches an earlier ``--batch`` run submitted stay pending in a real-time run."""
        store = BatchStore(self.journal)
        if self.options.server.api != "openai" and any(c.state == COLLECTED for c in store.chunks()):
            log.warning(
                "this output's answers came from batch mode, as OpenAI-compatible requests: add "
                "--api openai to reuse them, or this run sends their rows again"
            )
        if store.forget_simulated():
            log.warning("the batches of an earlier --simulate run ended with it: their rows are sent now")
        running = store.chunks(open_only=True)
        if not running:
            return None
        rows = sum(chunk.lines for chunk in running)
        log.warning(
            "%s rows are in %s batch(es) not yet collected: they stay pending (never sent twice); "
            "run with --batch to collect them",
            f"{rows:,}",
            len(running),
        )
        return held_rows(store, self.options.server.model)

    async def _batch_pass(self, config: RunConfig, control: RunControl) -> tuple[Hold, FatalAPIError | None]:
        """Batch mode before the pool: settle, collect, submit (and wait); a refusal by the
        Batch API stops the pass, and the output is still written, every row accounted for."""
        batch = self.options.batch
        speed = batch_speed(self.options)
        settings = BatchSettings(
            batch.batch_window.strip(),
            batch.wait,
            batch.batch_fallback,
            speed=speed,
            simulated=self.options.server.simulate,
        )
        async with BatchAPI(config) as api:
            run = BatchRun(
                config, self.prepared.spec, self.journal, api, settings, self.output,
                id_column=self.options.input.id_column, endpoint=self.metadata["endpoint"],
                retry_errors=self.options.policy.retry_errors, control=control, budget=self.budget,
            )  # fmt: skip
            task = asyncio.create_task(run.prepare(self.prepared.source.batches()))
            with control.watching(task):  # a second Ctrl-C stops the pass where it is
                try:
                    await task
                except FatalAPIError as exc:
                    return run.hold, exc
                except OSError as exc:  # the chunk file beside the output: a full disk, say
                    message = f"batch mode could not write beside {self.output}: {exc.strerror or exc}"
                    return run.hold, FatalAPIError(
                        message + "; free space there and run again", code="OSError"
                    )
                except asyncio.CancelledError:
                    if not task.cancelled() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                        raise
                    log.warning("the batch pass stopped where it was; the next run settles what it left")
        return run.hold, None

    def _progress(self) -> Progress | JsonProgress | None:
        if self.options.output.quiet:
            return None
        if self.options.output.log_format == "json":
            return JsonProgress(log)
        return Progress()

    def _report(self, result: RunResult, target: Path, replaced: tuple[Path, str] | None) -> None:
        """What happened, on stderr: why it stopped, where the table went, the summary line."""
        if result.fatal is not None:
            fatal = result.fatal
            log.error("%s", fatal, extra=event("fatal", code=fatal.code, http_status=fatal.http_status))
        if target != self.output:
            log.warning("kept the existing %s; this run's table is %s", self.output, target)
        if replaced is not None:
            log.warning(
                "%s held the answers of another request set (%s); it is kept as %s, and the journal "
                "keeps its answers: running that command again sends nothing",
                self.output,
                replaced[1],
                replaced[0],
            )
        self._report_stop(result)
        stats = result.stats
        if stats.error_codes:  # exit 3 says why without opening the table
            codes = ", ".join(f"{code} {n:,}" for code, n in stats.error_codes.most_common())
            log.info("errors by code: %s", codes)
        summary = event("summary", **self.summary.counts(), output=str(target))
        log.info("%s · wrote %s", summary_line(stats), target, extra=summary)

    def _report_stop(self, result: RunResult) -> None:
        skipped = result.stats.skipped
        if result.stopped == "budget" and self.budget is not None:
            budget = self.budget
            log.warning(
                "stopped by --max-cost: %s $%s of $%s%s; %s rows not sent are marked "
                "skipped; run the same command with a higher --max-cost to continue",
                "committed (the worst case of the batches submitted)"
                if self.options.batch.batch
                else "spent",
                f"{budget.spent:.4f}",
                self.options.policy.max_cost,
                _refused(budget),
                f"{skipped:,}",
                extra=event("stopped", reason="budget", spent_usd=str(budget.spent), skipped=skipped),
            )
        elif result.stopped is not None:
            log.warning(
                "stopped by %s: %s; run the same command again to finish (journal: %s)",
                result.stopped,
                f"{skipped:,} rows not answered are marked skipped" if skipped else "no row was skipped",
                self.journal.path,
                extra=event("stopped", signal=result.stopped, skipped=skipped),
            )


def _refused(budget: Budget) -> str:
    """What the request --max-cost refused could have cost, and what would lower it."""
    if budget.refused is None:
        return ""
    lower = (
        "--disable-thinking, or a --thinking-budget, lowers that: reasoning is billed on top "
        "of --max-tokens, up to the model's longest output"
        if budget.thinking and budget.thinking_budget is None
        else "--max-tokens or a lower --thinking-budget lowers that"
        if budget.thinking
        else "--max-tokens lowers that"
    )
    return f" (the next request could cost up to ${budget.refused:.4f}; {lower})"


def _on_signal(control: RunControl, name: str, grace: float, batch: bool = False) -> None:
    if control.stopping:
        log.warning(
            "%s again: stopping now; the journal keeps every finished row",
            name,
            extra=event("stop_now", signal=name),
        )
        control.stop_now()
        return
    doing = "submitting nothing more and cancelling no batch" if batch else "sending no more requests"
    log.warning(
        "%s: %s; letting calls in flight finish (up to %gs); send it again (Ctrl-C) to stop at once",
        name,
        doing,
        grace,
        extra=event("stopping", signal=name, grace=grace),
    )
    control.stop(name, grace)
