"""Drives ragchat's /v1 API with the official `openai` Python client.

Usage: python3 tests/clients/openai_client.py BASE_URL API_KEY
Run by tests/api/models.rs; exits non-zero with a message on any mismatch.
"""
import sys

from openai import OpenAI


def main() -> None:
    base, key = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list()]
    assert ids == ["smollm2-135m-instruct", "all-minilm-l6-v2"], ids

    emb = client.embeddings.create(model="all-minilm-l6-v2", input=["hello world", "goodbye"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384, emb
    assert emb.usage.prompt_tokens > 0, emb.usage

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=16, temperature=0
    )
    text = plain.choices[0].message.content
    assert text and plain.choices[0].finish_reason in ("stop", "length"), plain
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    streamed = ""
    finish = None
    for chunk in client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=16, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            streamed += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert streamed == text, (streamed, text)
    assert finish in ("stop", "length"), finish
    print("OK", repr(text))


if __name__ == "__main__":
    main()
