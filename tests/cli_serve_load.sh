#!/usr/bin/env bash
# m3 serve under 256 concurrent streaming clients, three rounds: exact texts, no KV page held
# afterwards, flat memory (tests/js/load.mjs).
exec bash "$2/tests/js/with_server.sh" "$1" "$2" load.mjs --test-hooks --no-prefix-cache
