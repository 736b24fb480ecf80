#!/usr/bin/env bash
# m3 serve's safety limits: API key, body size, concurrency, client hang-up cancelling its
# request, SIGTERM draining (tests/js/limits.mjs).
exec bash "$2/tests/js/with_server.sh" "$1" "$2" limits.mjs --api-key secret --max-body 4096 --max-concurrent 2 --no-prefix-cache
