"""Images in requests to the simulator: which it takes, how it bills and names them, body limits."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
from simulator_support import (
    CAT_URL,
    MULTIMODAL,
    PNG,
    PNG_URI,
    TEXT,
    assert_error,
    text_body,
)

from batchgen.simulator import (
    IMAGE_TOKENS,
    SimulatorThread,
    count_tokens,
    image_id,
    simulated_reply,
)

# --- images -----------------------------------------------------------------------------------


def test_image_id_hashes_the_decoded_bytes_or_the_url() -> None:
    assert image_id(PNG_URI) == hashlib.sha256(PNG).hexdigest()[:8]
    assert image_id(PNG_URI.replace("image/png", "image/jpeg")) == image_id(PNG_URI)
    assert image_id(CAT_URL) == hashlib.sha256(CAT_URL.encode()).hexdigest()[:8]
    assert len({image_id(PNG_URI), image_id(CAT_URL)}) == 2


def test_images_are_billed_and_named_in_the_reply(sim: SimulatorThread, client: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": [{"text": "Be brief."}]},
        {"role": "user", "content": [{"image": CAT_URL}, {"image": PNG_URI}, {"text": "What is this?"}]},
    ]
    response = client.post(MULTIMODAL, json={"model": "qwen-vl-max", "input": {"messages": messages}})

    data = response.json()
    content = data["output"]["choices"][0]["message"]["content"][0]["text"]
    assert content.startswith(
        f'Qwen (simulated) on "What is this?" [2 images: {image_id(CAT_URL)}, {image_id(PNG_URI)}]: '
    )
    text_tokens = count_tokens("Be brief.") + 4 + count_tokens("What is this?") + 4 + 3
    assert data["usage"]["input_tokens"] == text_tokens + 2 * IMAGE_TOKENS
    assert data["usage"]["image_tokens"] == 2 * IMAGE_TOKENS
    assert data["usage"]["input_tokens_details"] == {
        "text_tokens": text_tokens,
        "image_tokens": 2 * IMAGE_TOKENS,
    }
    expected = simulated_reply("qwen-vl-max", messages)
    assert (content, expected.image_tokens) == (expected.content, 2 * IMAGE_TOKENS)
    assert expected.image_ids == (image_id(CAT_URL), image_id(PNG_URI))


@pytest.mark.parametrize(
    "image",
    [
        "data:image/jpeg;base64,/9j/4AAQ",
        "data:image/webp;base64,UklGRg==",
        "data:image/gif;base64,R0lGODlh",
        "data:image/bmp;base64,Qk0=",
        "data:image/tiff;base64,SUkqAA==",
        "data:image/heic;base64,AAAA",
        "DATA:IMAGE/PNG;BASE64,iVBORw0KGgo=",
        "http://example.com/a.jpg",
        "HTTPS://example.com/a?b=c",
    ],
)
def test_supported_images_are_accepted(client: httpx.Client, image: str) -> None:
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Hi"}]}]
    response = client.post(MULTIMODAL, json={"model": "qwen3-vl-plus", "input": {"messages": messages}})

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("image", "message"),
    [
        pytest.param("file:///home/me/cat.png", "cannot read local files or paths", id="file-url"),
        pytest.param("/home/me/cat.png", "cannot read local files or paths", id="bare-path"),
        pytest.param("cat.png", "cannot read local files or paths", id="relative-path"),
        pytest.param(
            "data:image/png;base64,not base64!",
            "base64 data of an image data URI is invalid",
            id="bad-base64",
        ),
        pytest.param(
            "data:image/png;base64,", "base64 data of an image data URI is invalid", id="empty-base64"
        ),
        pytest.param(
            "data:text/plain;base64,aGk=", "Unsupported image MIME type 'text/plain'", id="not-image"
        ),
        pytest.param(
            "data:image/svg+xml;base64,PHN2Zz4=", "Unsupported image MIME type 'image/svg+xml'", id="svg"
        ),
        pytest.param("data:image/png,rawbytes", "must be base64-encoded", id="not-base64-encoded"),
        pytest.param(42, "should be a non-empty string", id="not-a-string"),
        pytest.param("", "should be a non-empty string", id="empty"),
    ],
)
def test_bad_images_are_400(client: httpx.Client, image: Any, message: str) -> None:
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Hi"}]}]
    response = client.post(MULTIMODAL, json={"model": "qwen-vl-max", "input": {"messages": messages}})

    assert response.status_code == 400
    assert response.json()["code"] == "InvalidParameter"
    assert message in response.json()["message"]


def test_video_and_audio_parts_are_accepted_and_ignored(client: httpx.Client) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"video": "https://example.com/v.mp4"},
                {"audio": "https://example.com/a.mp3"},
                {"text": "Hi"},
            ],
        }
    ]
    response = client.post(MULTIMODAL, json={"model": "qwen3.5-plus", "input": {"messages": messages}})

    data = response.json()
    expected = simulated_reply("qwen3.5-plus", messages)
    assert data["output"]["choices"][0]["message"]["content"] == [{"text": expected.content}]
    assert expected.content.startswith('Qwen (simulated) on "Hi": ')
    assert data["usage"]["input_tokens_details"] == {"text_tokens": expected.input_tokens}


def test_an_image_on_the_text_route_is_400(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": [{"image": CAT_URL}, {"text": "Hi"}]}]
    response = client.post(TEXT, json=text_body(messages=messages))

    assert_error(
        response,
        400,
        "InvalidParameter",
        "Image input is not supported on the text-generation route; send images to a vision model on the "
        "multimodal-generation route.",
    )


MIB = 1024 * 1024


def test_a_body_over_16_mib_without_base64_is_too_large(client: httpx.Client) -> None:
    body = text_body(messages=[{"role": "user", "content": "a" * (16 * MIB)}])

    assert_error(client.post(TEXT, json=body), 413, "BadRequest.TooLarge", "Request body too large.")


def test_a_body_over_16_mib_with_a_base64_image_is_accepted(client: httpx.Client) -> None:
    image = "data:image/png;base64," + "A" * (17 * MIB)
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Describe"}]}]

    response = client.post(MULTIMODAL, json={"model": "qwen-vl-max", "input": {"messages": messages}})

    assert response.status_code == 200
    content = response.json()["output"]["choices"][0]["message"]["content"][0]["text"]
    assert f"[1 image: {hashlib.sha256(bytes(17 * MIB * 3 // 4)).hexdigest()[:8]}]" in content


def test_a_body_over_64_mib_is_too_large(client: httpx.Client) -> None:
    image = "data:image/png;base64," + "A" * (64 * MIB)
    messages = [{"role": "user", "content": [{"image": image}, {"text": "Describe"}]}]

    response = client.post(MULTIMODAL, json={"model": "qwen-vl-max", "input": {"messages": messages}})

    assert_error(response, 413, "BadRequest.TooLarge", "Request body too large.")
