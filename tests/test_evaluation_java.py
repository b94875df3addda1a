"""Evaluation never hangs on a Java that is on the PATH but cannot run: the PTB tokenizer or METEOR
that fails to start, or never answers, is skipped with a warning, and the other metrics still come.

Each case runs in a subprocess under a timeout: a hang fails the test instead of stalling the suite.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT

REFS = {1: ["a red circle to the left of a blue square", "A red circle and a blue square."],
        2: ["a green triangle above a yellow circle", "The green triangle is above the yellow circle"]}
RIGHT = {1: "a red circle to the left of a blue square", 2: "a green triangle above a yellow circle"}
SCORE = f"""
import json
from captioning.evaluation import score_captions
refs = {{int(k): v for k, v in json.loads({json.dumps(json.dumps(REFS))}).items()}}
right = {{int(k): v for k, v in json.loads({json.dumps(json.dumps(RIGHT))}).items()}}
metrics, _ = score_captions(refs, right)
print("METRICS " + json.dumps(metrics))
"""
REAL_JAVA = shutil.which("java")


def fake_java(folder, body):
    """A `java` first on the PATH that runs `body` (bash)."""
    folder.mkdir(exist_ok=True)
    path = folder / "java"
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


JAVA_TIMEOUT, DEFAULT_JAVA_TIMEOUT = 3, 120     # CAPTIONING_JAVA_TIMEOUT here, and when it is not set


def score(env, limit=60):
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", SCORE], cwd=ROOT, capture_output=True, text=True, timeout=limit,
                          env={**os.environ, "CAPTIONING_JAVA_TIMEOUT": str(JAVA_TIMEOUT), **env})
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.split("METRICS ", 1)[1])
    return metrics, proc.stdout, time.time() - t


def test_a_java_that_cannot_start_is_skipped(tmp_path):
    env = fake_java(tmp_path / "bin", 'echo "Error: Could not create the Java Virtual Machine." >&2; exit 1')
    metrics, out, _ = score(env)
    assert "Could not create the Java Virtual Machine" in out and "tokenizing in Python and skipping METEOR" in out
    assert "METEOR" not in metrics and metrics["Bleu_4"] > 0.9 and "CIDEr" in metrics


def test_a_java_that_never_answers_is_given_up_on(tmp_path):
    env = fake_java(tmp_path / "bin", "exec sleep 300")
    metrics, out, seconds = score(env, limit=2 * DEFAULT_JAVA_TIMEOUT)
    assert "no answer within 3 s" in out and "METEOR" not in metrics and metrics["Bleu_4"] > 0.9
    # bounds from the timeouts, not this machine's speed: it waited the configured 3 s, and gave up long
    # before the default 120 s would have ended it
    assert JAVA_TIMEOUT <= seconds < DEFAULT_JAVA_TIMEOUT, seconds


@pytest.mark.skipif(REAL_JAVA is None, reason="needs a real Java for the PTB tokenizer")
def test_a_meteor_that_never_answers_is_skipped_alone(tmp_path):
    # the PTB tokenizer runs on the real Java; METEOR's JVM (-jar) hangs
    env = fake_java(tmp_path / "bin", f'case " $* " in *" -jar "*) exec sleep 300;; esac; exec {REAL_JAVA} "$@"')
    metrics, out, seconds = score(env, limit=2 * DEFAULT_JAVA_TIMEOUT)
    assert "METEOR skipped" in out and "no answer within 3 s" in out
    assert "METEOR" not in metrics and metrics["Bleu_4"] > 0.9 and "tokenizing in Python" not in out
    assert JAVA_TIMEOUT <= seconds < DEFAULT_JAVA_TIMEOUT, seconds     # as above


@pytest.mark.skipif(REAL_JAVA is None, reason="needs Java")
def test_java_tool_options_that_clash_with_meteors_heap_skip_meteor(tmp_path):
    """JAVA_TOOL_OPTIONS=-Xms3g against METEOR's -Xmx2G: the JVM refuses to start. pycocoevalcap's
    METEOR then deadlocks; here it is skipped, naming the reason."""
    metrics, out, _ = score({"JAVA_TOOL_OPTIONS": "-Xms3g", "CAPTIONING_JAVA_TIMEOUT": "60"}, limit=120)
    assert "METEOR skipped" in out and "heap" in out.lower(), out
    assert "METEOR" not in metrics and metrics["Bleu_4"] > 0.9


@pytest.mark.skipif(REAL_JAVA is None, reason="needs Java")
def test_meteor_and_ptb_match_pycocoevalcaps_own_wrappers():
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from captioning.evaluation import meteor_score, ptb_tokenize

    wrong = {1: "a green triangle above a yellow circle .", 2: "a red circle, to the left of a blue square"}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in REFS.items()})
    res = tokenizer.tokenize({i: [{"caption": wrong[i]}] for i in REFS})
    assert ptb_tokenize(REFS) == gts and ptb_tokenize({i: [wrong[i]] for i in REFS}) == res
    theirs = Meteor().compute_score(gts, res)
    ours = meteor_score(gts, res)
    assert ours == theirs and 0 < ours[0] < 1


@pytest.mark.skipif(REAL_JAVA is None, reason="needs Java")
def test_an_empty_last_caption_keeps_the_java_tokenizer_and_meteor():
    """An empty prediction for the last image once made the tokenizer answer one line too few: METEOR was
    dropped, with a warning blaming Java. Blank captions now tokenize to "" and score 0, and Java stays."""
    from captioning.evaluation import ptb_tokenize, score_captions

    assert ptb_tokenize({1: ["A red circle."], 2: ["", "  \t"], 3: ["a\r\nblue  square"], 4: [""]}) == \
        {1: ["a red circle"], 2: ["", ""], 3: ["a blue square"], 4: [""]}
    said, details = [], {}
    metrics, per_image = score_captions(REFS, {1: RIGHT[1], 2: ""}, log=said.append, details=details)
    assert said == [] and details["tokenizer"] == "ptb-java"
    assert "METEOR" in metrics and per_image[2]["METEOR"] == 0 and per_image[1]["METEOR"] > 0.9
    assert per_image[2]["Bleu_1"] < 1e-6 and per_image[1]["Bleu_4"] > 0.9


SPICE_SCORE = f"""
import json, sys
import captioning.evaluation as ev
ev.spice_available = lambda: True            # SPICE's CoreNLP jars are a download: the fake java stands in
refs = {{int(k): v for k, v in json.loads({json.dumps(json.dumps(REFS))}).items()}}
right = {{int(k): v for k, v in json.loads({json.dumps(json.dumps(RIGHT))}).items()}}
details = {{}}
metrics, per_image = ev.score_captions(refs, right, details=details, **json.loads(sys.argv[1]))
print("METRICS " + json.dumps([metrics, details["skipped"], per_image[2]]))
"""
# a `java` without Java: the PTB tokenizer lower-cases each line, METEOR cannot start, SPICE runs $SPICE
FAKE_JAVA = """case " $* " in
  *PTBTokenizer*) tr '[:upper:]' '[:lower:]' < "${@: -1}";;
  *spice-1.0.jar*) eval "$SPICE";;
  *) echo "Error: no METEOR here" >&2; exit 1;;
esac"""
# writes what SPICE writes: [{image_id, scores: {All: {f, pr, re}, ...}}], All.f = image id / 4
SPICE_WRITES = (f"'{sys.executable}' -c '"
                "import json, sys; a = sys.argv[1:]; rows = json.load(open(a[a.index(\"spice-1.0.jar\") + 1])); "
                "json.dump([{\"image_id\": r[\"image_id\"], \"scores\": {\"All\": {\"f\": r[\"image_id\"] / 4, "
                "\"pr\": 1, \"re\": None}}} for r in rows], open(a[a.index(\"-out\") + 1], \"w\"))' \"$@\"")


def spice_score(tmp_path, spice, args, env=()):
    env = {**fake_java(tmp_path / "bin", FAKE_JAVA), "SPICE": spice, **dict(env)}
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", SPICE_SCORE, json.dumps(args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "CAPTIONING_JAVA_TIMEOUT": "10", **env})
    assert proc.returncode == 0, proc.stderr
    metrics, skipped, second = json.loads(proc.stdout.split("METRICS ", 1)[1])
    return metrics, skipped, second, proc.stdout, time.time() - t


def test_a_spice_past_its_timeout_is_skipped_and_the_other_metrics_kept(tmp_path):
    metrics, skipped, _, out, seconds = spice_score(tmp_path, "exec sleep 300", {"spice_timeout": 2})
    assert "SPICE" not in metrics and skipped["SPICE"].startswith("it did not end within 2 s")
    assert "warning: SPICE skipped: it did not end within 2 s" in out and "the other metrics are kept" in out
    assert metrics["Bleu_4"] > 0.9 and metrics["ROUGE_L"] > 0.9 and "CIDEr" in metrics
    assert seconds < 30
    # the same limit from the environment (what `evaluate` reads when no --spice-timeout is given)
    metrics, skipped, _, out, _ = spice_score(tmp_path, "exec sleep 300", {}, {"CAPTIONING_SPICE_TIMEOUT": "1.5"})
    assert "SPICE" not in metrics and skipped["SPICE"].startswith("it did not end within 1.5 s")
    assert metrics["Bleu_4"] > 0.9


def test_spice_run_here_reads_what_spice_writes(tmp_path):
    metrics, skipped, second, out, _ = spice_score(tmp_path, SPICE_WRITES, {"spice_timeout": 30})
    assert skipped == {"METEOR": "Error: no METEOR here"} and metrics["SPICE"] == pytest.approx(0.375)
    assert second["SPICE"] == 0.5 and metrics["Bleu_4"] > 0.9
    # a SPICE that fails is skipped the same way, naming what it said
    metrics, skipped, _, out, _ = spice_score(tmp_path, 'echo "java.lang.OutOfMemoryError" >&2; exit 1', {})
    assert "SPICE" not in metrics and "OutOfMemoryError" in skipped["SPICE"] and metrics["Bleu_4"] > 0.9
