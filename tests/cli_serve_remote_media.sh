#!/usr/bin/env bash
# m3 serve --allow-remote-media fetching http image URLs from a loopback image server: fetched
# images equal inline ones; redirects, protocols, status, timeout, byte cap, non-images and the
# download limit (tests/js/remote_media.mjs).
# A proxy from the environment would take the loopback requests elsewhere.
no_proxy='*' NO_PROXY='*' exec bash "$2/tests/js/with_server.sh" "$1" "$2" remote_media.mjs --allow-remote-media --remote-media-timeout-ms 2500 --max-body 65536
