"""Fake LLM provider HTTP server (OpenAI chat completions + responses, Anthropic messages) for tests."""

from tests.fakeprovider.server import ANSWER, USAGE, FakeProvider

__all__ = ["ANSWER", "USAGE", "FakeProvider"]
