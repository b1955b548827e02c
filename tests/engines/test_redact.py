"""Redactor: secret flags, NAME=value arguments, shell command lines and URLs are masked; nothing else."""

from __future__ import annotations

import pytest

from synapse_gateway.engines.redact import Redactor, secret_name


@pytest.mark.parametrize(("name", "secret"), [
    ("--api-key", True), ("--hf-token", True), ("--hf_token", True), ("HF_TOKEN", True), ("--apikey", True),
    ("--db-password", True), ("--client-secret", True), ("OPENAI_API_KEY", True), ("--basic-auth", True),
    ("--max-tokens", False), ("--max-num-batched-tokens", False), ("--tokenizer", False), ("--port", False),
    ("--keyfile", False), ("CUDA_VISIBLE_DEVICES", False),
])
def test_secret_names(name: str, secret: bool) -> None:
    assert secret_name(name) is secret


def test_the_command_shows_everything_but_the_secrets() -> None:
    redactor = Redactor(["vllm", "serve", "m", "--api-key", "sk-abcdef", "--hf-token=hf_xyz123", "--port", "80",
                         "--max-tokens", "4096", "HF_TOKEN=abcd1234", "CUDA_VISIBLE_DEVICES=0",
                         "--url", "http://user:pass1234@host/v1"])
    assert redactor.command == ["vllm", "serve", "m", "--api-key", "***", "--hf-token=***", "--port", "80",
                                "--max-tokens", "4096", "HF_TOKEN=***", "CUDA_VISIBLE_DEVICES=0",
                                "--url", "http://***@host/v1"]


def test_a_shell_command_line_is_masked_inside() -> None:
    redactor = Redactor(["sh", "-c", "exec vllm serve m --api-key 's3cr3t value' OPENAI_API_KEY=k123456"])
    assert redactor.command == ["sh", "-c", "exec vllm serve m --api-key *** OPENAI_API_KEY=***"]
    assert redactor.text("got s3cr3t value and k123456") == "got *** and ***"


def test_secret_values_are_masked_in_output_and_env_values_too() -> None:
    redactor = Redactor(["engine", "--token", "tok-0123456789"], env={"HF_TOKEN": "hf_envsecret", "HOME": "/root"})
    line = "args: {'token': 'tok-0123456789'} hf=hf_envsecret home=/root at http://a:b@h/"
    assert redactor.text(line) == "args: {'token': '***'} hf=*** home=/root at http://***@h/"


def test_a_flag_followed_by_another_flag_hides_nothing() -> None:
    assert Redactor(["engine", "--disable-auth", "--port", "1"]).command == ["engine", "--disable-auth", "--port", "1"]
