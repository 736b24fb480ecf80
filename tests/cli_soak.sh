#!/usr/bin/env bash
# A short form of scripts/soak.sh (15 s of random mixed requests against m3 serve): no 5xx, right
# answers, every KV page free afterwards, flat memory, clean exit on SIGTERM.
exec bash "$2/scripts/soak.sh" --m3 "$1" --seconds 15 --concurrency 4 --sample-seconds 1 --kv-memory 8
