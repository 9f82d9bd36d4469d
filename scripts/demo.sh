#!/usr/bin/env bash
# End-to-end demo: train a tokenizer + small Transformer chatbot on the corpus shipped
# with chatforge, serve it over gRPC, ask it questions through the client, shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/demo
PORT_FILE=$(mktemp)
LOG=$RUN/server.log
rm -f "$PORT_FILE"

echo "== 1/4 train (configs/demo.yaml: sample corpus, Transformer encoder-decoder)"
chatforge train configs/demo.yaml --run-dir "$RUN"

echo "== 2/4 serve on a free port"
chatforge serve --model chat="$RUN/bundle" --port 0 --port-file "$PORT_FILE" >"$LOG" 2>&1 &
SERVER=$!
cleanup() { kill -TERM "$SERVER" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 120); do          # up to 60 s for the model to load
  [ -s "$PORT_FILE" ] && break
  kill -0 "$SERVER" 2>/dev/null || { echo "server died:"; cat "$LOG"; exit 1; }
  sleep 0.5
done
[ -s "$PORT_FILE" ] || { echo "server did not become ready:"; cat "$LOG"; exit 1; }
ADDR=127.0.0.1:$(cat "$PORT_FILE")
chatforge health "$ADDR" --service chatforge.v1.Chatbot

echo "== 3/4 chat (replies stream token by token)"
chatforge chat "$ADDR" \
  -m "안녕하세요" -m "오늘 날씨 어때?" -m "너 이름이 뭐야?" \
  -m "hello there" -m "what's your name?" -m "tell me a joke"

echo "== 4/4 shut down (SIGTERM -> NOT_SERVING -> drain -> exit 0)"
trap - EXIT
kill -TERM "$SERVER"
wait "$SERVER"
echo "server exited cleanly; run folder: $RUN"
