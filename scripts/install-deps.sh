#!/usr/bin/env bash
# Installs what building and testing m3 needs on Debian 12 (run as root or through sudo).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  build-essential cmake ninja-build pkg-config clang llvm \
  libcjson-dev libpcre2-dev libmicrohttpd-dev libcurl4-openssl-dev zlib1g-dev jq valgrind \
  libjpeg62-turbo-dev libpng-dev libwebp-dev libgif-dev libavformat-dev libavcodec-dev \
  libswscale-dev libavutil-dev >/dev/null
# Node and npm run the test-only clients; keep an existing Node install (e.g. from NodeSource,
# whose nodejs package conflicts with Debian's npm).
if ! command -v npm >/dev/null; then
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
