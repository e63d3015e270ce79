#!/usr/bin/env bash
# Regenerates tests/schema/ from the pinned Codex release: the wire authority
# (PROTOCOL §5). Bump CODEX_VERSION here and in tests/codex_cli.py together.
set -euo pipefail
CODEX_VERSION=0.169.0
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
npm install --silent --no-audit --no-fund --prefix "$work" "@openai/codex@$CODEX_VERSION"
"$work/node_modules/.bin/codex" app-server generate-json-schema --experimental --out "$work/schema"
cp "$work/schema/codex_app_server_protocol.schemas.json" tests/schema/
echo "tests/schema/ now holds the schema of @openai/codex@$CODEX_VERSION"
