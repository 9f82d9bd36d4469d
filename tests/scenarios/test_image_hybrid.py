"""The hybrid bot (a retrieval selector in front of a generator, behind a reply policy file with the familiarity guard)
served from the serving image, as an operator deploys the README's chit-chat bot.

The selector is an estimator bundle: it needs scikit-learn and XGBoost, which the image's default ``EXTRAS``
(``serve,postgres``) leaves out. So: the default image, given the selector, stops at start naming the build argument;
the image built with ``EXTRAS=serve,postgres,estimators`` (no training stack) serves the bot, run as the Deployment runs
it (read-only root, no capabilities, uid 10001, bundles and policy mounted read-only), and answers through its
published ports: a training question from the pool over gRPC and with the official OpenAI client, a message the
selector scores low from the generator, streamed, and random syllables with the fallback, out of scope.

Skipped, with the reason printed, only where the container engine cannot start a container.
"""

from __future__ import annotations

import random
import uuid

import pytest
from tests.container_helpers import LIMITS, build, podman, running, size_mb
from tests.deploy_helpers import (
    TRAIN_ONLY_MODULES,
    free_port,
    say,
    train_tiny_bundles,
    train_tiny_selector,
)

from chatforge.client import ChatbotClient

pytestmark = pytest.mark.slow

FALLBACK = "잘 모르겠어요. 다르게 말씀해 주시겠어요?"
EXTRAS = "serve,postgres,estimators"
KNOWN = ["배고파", "오늘 날씨 어때?", "안녕하세요"]  # questions of the sample corpus the selector was trained on
PROBES = ["우리 집 고양이가 피아노를 쳐", "내일 회의 자료 좀 봐줘", "주말에 등산 갈까", "새 노트북 사고 싶어",
          "요즘 잠이 안 와", "동생이랑 싸웠어"]  # Korean, not in the corpus: one of them goes to the generator


@pytest.fixture(scope="module")
def bot(tmp_path_factory) -> dict:
    """A tiny generator and a tiny ranker selector, and a policy whose threshold and guard are set from what the
    selector itself says of the messages the tests send (as `chatforge replies --hybrid` sets them on validation)."""
    from chatforge.inference import load_model

    tmp = tmp_path_factory.mktemp("hybrid")
    chat, _ = train_tiny_bundles(tmp)
    selector = train_tiny_selector(tmp, encoder="ranker", ranker_trees=10, ranker_negatives=3,
                                   ranker_neighbours=[3, 10])
    served = load_model(selector, "selector")
    known = {t: served.select(t) for t in KNOWN}
    threshold = min(score for _, score in known.values())
    low = min(PROBES, key=lambda t: served.select(t)[1])
    assert served.select(low)[1] < threshold, "every probe clears the threshold: no message for the generator"
    rng = random.Random(0)
    mash = ["".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(6)) for _ in range(3)]
    guard = min(served.familiarity(t) for t in [*KNOWN, low]) - 0.5
    assert max(served.familiarity(t) for t in mash) < guard, "random syllables look familiar to the guard"
    policy = tmp / "policy" / "policy.yaml"
    policy.parent.mkdir()
    policy.write_text(f"retriever: selector\nmin_familiarity: {guard}\nretrieval_threshold: {threshold}\n"
                      f"generate: true\ngenerator: chat\nfallback_reply: {FALLBACK}\n", encoding="utf-8")
    return {"chat": chat, "selector": selector, "policy": policy.parent, "known": known, "low": low, "mash": mash}


def _run_args(bot: dict) -> list[str]:
    return ["-v", f"{bot['chat']}:/models/chat:ro", "-v", f"{bot['selector']}:/models/selector:ro",
            "-v", f"{bot['policy']}:/policy:ro"]


SERVE = ["--model", "chat=/models/chat", "--model", "selector=/models/selector", "--policy", "/policy/policy.yaml",
         "--host", "0.0.0.0", "--port", "50051", "--http-port", "8080", "--drain-delay", "1", "--grace", "10"]


def test_the_default_image_refuses_the_selector_naming_the_build_argument(serving_image, bot):
    r = podman("run", "--rm", *LIMITS, "--network", "none", "--read-only", "--tmpfs", "/tmp",
               "-e", "CHATFORGE_STORE_URL=sqlite:////tmp/conversations.db", *_run_args(bot),
               serving_image, *SERVE, check=False, timeout=180)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "needs scikit-learn, scipy, xgboost-cpu, which this installation lacks" in r.stderr, r.stderr[-3000:]
    assert f"--build-arg EXTRAS={EXTRAS}" in r.stderr


@pytest.fixture(scope="module")
def hybrid(engine, bot, pytestconfig):
    tag = "localhost/chatforge-estimators:ci"
    took = build("deploy/Dockerfile", tag, EXTRAS=EXTRAS)
    say(pytestconfig, f"\nserving image with EXTRAS={EXTRAS} {tag}: {size_mb(tag):.0f} MB, built in {took:.0f} s")
    name, volume = f"chatforge-hy-{uuid.uuid4().hex[:8]}", f"chatforge-hy-data-{uuid.uuid4().hex[:8]}"
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    podman("volume", "create", volume)
    podman("run", "-d", "--name", name, *LIMITS, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
           "--security-opt", "no-new-privileges", "--cpus", "1", "--memory", "1g", "-v", f"{volume}:/data",
           *_run_args(bot), "-p", f"127.0.0.1:{grpc_port}:50051", "-p", f"127.0.0.1:{metrics_port}:9100",
           "-p", f"127.0.0.1:{http_port}:8080", tag, *SERVE)
    info = {"name": name, "tag": tag, "grpc": f"127.0.0.1:{grpc_port}", "metrics": f"http://127.0.0.1:{metrics_port}",
            "http": f"http://127.0.0.1:{http_port}"}
    with running(name, info["metrics"] + "/readyz", volume):
        yield info


def test_the_estimators_image_has_no_training_stack(hybrid):
    probe = ("import importlib.util as u, sklearn, xgboost, faiss; "
             f"print(sorted(m for m in {TRAIN_ONLY_MODULES!r} if u.find_spec(m)))")
    got = podman("exec", hybrid["name"], "python3", "-c", probe).stdout.strip()
    assert got == str(sorted({"sklearn", "scipy", "xgboost", "faiss"})), got


def test_it_serves_the_hybrid_bot_over_grpc_every_path(hybrid, bot):
    with ChatbotClient(hybrid["grpc"], timeout=60) as client:
        for text, (answer, score) in bot["known"].items():
            chunks = list(client.reply_stream(text))
            final = chunks[-1]
            assert "".join(c.text for c in chunks[:-1]) == answer, text
            assert (final.path, final.model, final.out_of_scope) == ("retrieval", "selector", False), text
            assert final.path_score == pytest.approx(score, abs=1e-4)
        chunks = list(client.reply_stream(bot["low"]))
        assert (chunks[-1].path, chunks[-1].model, chunks[-1].out_of_scope) == ("generation", "chat", False)
        assert len(chunks) >= 2 and chunks[-1].completion_tokens == len(chunks) - 1  # streamed token by token
        for text in bot["mash"]:
            chunks = list(client.reply_stream(text))
            assert "".join(c.text for c in chunks[:-1]) == FALLBACK, text
            assert (chunks[-1].path, chunks[-1].out_of_scope) == ("fallback", True), text
    # loaded and answered under a read-only root as uid 10001 without a warning (no cache or temp dir it could not write)
    logs = podman("logs", hybrid["name"]).stderr
    assert '"event": "loaded model"' in logs
    assert not [ln for ln in logs.splitlines() if '"level": "WARNING"' in ln or '"level": "ERROR"' in ln], logs[-3000:]


def test_it_serves_the_hybrid_bot_to_the_official_openai_client(hybrid, bot):
    openai = pytest.importorskip("openai")
    text, (answer, _) = next(iter(bot["known"].items()))
    with openai.OpenAI(base_url=hybrid["http"] + "/v1", api_key="unused", timeout=60, max_retries=0) as client:
        whole = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": text}])
        assert whole.choices[0].message.content == answer
        assert whole.model_extra["chatforge"]["path"] == "retrieval"
        chunks = list(client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": bot["mash"][0]}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FALLBACK
    ext = [c.model_extra["chatforge"] for c in chunks if (c.model_extra or {}).get("chatforge")]
    assert len(ext) == 1 and ext[0]["path"] == "fallback" and ext[0]["out_of_scope"] is True
