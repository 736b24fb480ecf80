#!/usr/bin/env bash
# m3 serve under faults on a small KV pool (215 pages, an 860-token context): vanishing clients,
# pages exhausted, prompts over the context, thousands of tiny requests, slow readers, bad
# bodies; no KV page held once idle, flat memory; SIGTERM mid-generation (tests/js/faults.mjs).
exec bash "$2/tests/js/with_server.sh" "$1" "$2" faults.mjs --threads 1 --test-hooks --kv-memory 1 --max-running 8 --grace 0 --max-body 65536
