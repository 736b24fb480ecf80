#!/usr/bin/env bash
# m3 serve driven by the official OpenAI and Anthropic SDKs: every endpoint, streaming and not,
# thinking and tool calls from forced model output (tests/js/api.mjs).
exec bash "$2/tests/js/with_server.sh" "$1" "$2" api.mjs --test-hooks --max-n 4 --max-tokens-limit 2048
