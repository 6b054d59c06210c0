"""Stage 04: turn scored answers into preference pairs, best against worst per prompt.

Reads:  <run>/M<t-1>/generated/scores.jsonl and scores.manifest.json (stage 03's check of the judge)
Writes: <run>/M<t-1>/generated/preferences.jsonl  (prompt_id, prompt, chosen, rejected,
        score_chosen, score_rejected) and preferences.{manifest.json,config.yaml}

First the gate (judge.gate): stage 03 measured the judge M<t-1> on held-out human-scored answers. If
the lower end of the 95% interval of its pairwise accuracy is not above 0.5, its pairs are likely
noise: "warn" says so in one line and goes on, "stop" stops here with exit code 4 before writing
anything, "off" does not look. Then the canary gate (judge.canary_gate) on the fool rates stage 03
measured: a canary trick that outscored every real answer of its prompt more often than
judge.canary_max_fool_rate is said ("warn") or stops the stage with exit code 6 ("stop").

A prompt yields no pair when fewer than two of its answers have a score, when best and worst tie,
when their texts are identical, or when the gap is below preferences.min_margin ("auto": below the
judge noise stage 03 measured); the manifest counts each reason. preferences.length_control chooses
the shortest answer scored near the best. preferences.consistency filter (from iteration 2, CREAM)
also drops the pair of a prompt whose answers M<t-1> and M<t-2> rank unalike (Kendall tau below
preferences.min_agreement); every pair then records its `agreement`, and the manifest the mean.

    python scripts/04_gen_preferences.py --run-dir runs/demo --iteration 1
"""

from selfreward.loop.canaries import canary_verdict
from selfreward.loop.pairs import build_pairs, judges_agreement
from selfreward.run.records import SCORE, read_jsonl, read_manifest, write_jsonl
from selfreward.stage import CanaryGateError, GateError, StageError, log, parse_stage, run


def gate_verdict(check: dict) -> tuple[bool | None, str]:
    """(is the judge better than chance on held-out rows, a line that says so); None when unmeasured."""
    quality = check.get("heldout") or {}
    interval = (quality.get("intervals") or {}).get("pairwise_accuracy")
    if quality.get("pairwise_accuracy") is None or not interval:
        return None, f"the judge {check.get('judge', '?')} was not measured on held-out EFT rows"
    figures = f"pairwise accuracy {quality['pairwise_accuracy']:.2f}, 95% CI {interval[0]:.2f}–{interval[1]:.2f}"
    if interval[0] > 0.5:
        return True, f"the judge {check['judge']} is better than chance on held-out EFT rows ({figures})"
    return False, f"the judge {check['judge']} is not better than chance on held-out EFT rows ({figures}); " + (
        "its pairs are likely noise"
    )


def main() -> None:
    stage = parse_stage("04_gen_preferences", __doc__)
    layout, t, config = stage.layout, stage.iteration, stage.config
    scores_path = layout.generated(t, "scores")
    check_path = layout.manifest("03_gen_scores", t)
    stage.begin(inputs=[scores_path, check_path])
    scored = read_jsonl(scores_path, SCORE, id_field="response_id")
    check = (read_manifest(check_path) or {}).get("judge_check", {})
    good, line = apply_gate(check, config.judge.gate)
    canary_gate = apply_canary_gate(read_manifest(check_path) or {}, config.judge)
    margin = min_margin(config.preferences.min_margin, check)
    scored, pairs, dropped, stand_in_scores = best_against_worst(scored, margin, config.preferences, stage.dry_run)
    consistency = None
    if config.preferences.consistency != "off" and t >= 2:
        pairs, consistency = pairs_judges_agree_on(scored, pairs, config.preferences, t, scores_path)
        if consistency["dropped"]:
            dropped["judges_disagree"] = consistency["dropped"]
    prompts = len({r["prompt_id"] for r in scored})
    log.info("%d pairs from %d prompts; dropped: %s", len(pairs), prompts, dict(dropped) or "none")

    out = layout.generated(t, "preferences")
    stage.start_writing()
    write_jsonl(out, pairs)
    stage.finish(
        rows_in=len(scored),
        rows_out=len(pairs),
        outputs=[str(out)],
        extra={
            "prompts": prompts,
            "dropped": dict(dropped),
            "min_margin": margin,
            "shorter_chosen": sum(bool(p.get("chosen_by_length")) for p in pairs),
            **({"consistency": consistency} if consistency else {}),
            **({"stand_in_scores": True} if stand_in_scores else {}),
            "gate": {"setting": config.judge.gate, "better_than_chance": good, "verdict": line},
            "canary_gate": canary_gate,
        },
    )


def apply_gate(check: dict, gate: str) -> tuple[bool | None, str]:
    """The gate's verdict on stage 03's check of the judge; "stop" ends the stage on a judge no better than
    chance, "warn" says so and goes on."""
    good, line = gate_verdict(check)
    if gate != "off" and good is False:
        if gate == "stop":
            raise GateError(f"{line} (judge.gate: stop)")
        print(f"warning: {line}", flush=True)
    return good, line


def apply_canary_gate(scores_manifest: dict, judge) -> dict:
    """judge.canary_gate on the fool rates stage 03 measured: "stop" ends the stage (exit 6) when a canary
    trick outscored the real answers of its prompt more often than judge.canary_max_fool_rate, "warn" says
    so and goes on, "off" does not look. Made before any pair, like judge.gate: stage 03's judging stays."""
    name = (scores_manifest.get("judge_check") or {}).get("judge", "?")
    passed, line = canary_verdict(scores_manifest.get("canaries"), name, judge.canary_max_fool_rate)
    if judge.canary_gate != "off" and passed is False:
        if judge.canary_gate == "stop":
            raise CanaryGateError(f"{line} (judge.canary_gate: stop)")
        print(f"warning: {line}", flush=True)
    return {"setting": judge.canary_gate, "passed": passed, "verdict": line}


def min_margin(setting, check: dict) -> float:
    """The least score gap of a pair: preferences.min_margin, or with "auto" the judge noise stage 03 measured."""
    if setting != "auto":
        return setting
    margin = (check.get("noise") or {}).get("max_change") or 0.0
    log.info("min_margin auto: %.4f, the judge noise stage 03 measured", margin)
    return margin


def best_against_worst(scored: list[dict], margin, cfg, dry_run: bool):
    """(the scored rows, the pairs, the prompts without a pair by reason, whether the scores are stand-ins)."""
    tolerance = cfg.length_tolerance if cfg.length_control else None
    pairs, dropped = build_pairs(scored, margin, tolerance)
    if pairs or not dry_run:
        return scored, pairs, dropped, False
    # A random model writes no "Score: N": rank the answers by their sample index instead, so the
    # dry run still trains DPO on pairs of the configured shape.
    scored = [{**r, "score": float(-r["sample_index"])} for r in scored]
    pairs, dropped = build_pairs(scored, margin, tolerance)
    log.info("dry run: the stand-in judged nothing; %d pairs ranked by sample index", len(pairs))
    return scored, pairs, dropped, True


def pairs_judges_agree_on(scored: list[dict], pairs: list[dict], cfg, t: int, scores_path) -> tuple[list, dict]:
    """preferences.consistency (CREAM): the pairs of prompts whose answers M<t-1> and M<t-2> rank alike, each
    with its `agreement`, and the manifest's account of the filter."""
    if not any("previous_score" in r for r in scored):
        raise StageError(
            f"{scores_path} has no previous_score: rerun stage 03 with --preferences.consistency "
            f"{cfg.consistency}, so that M{t - 2} scores the answers too"
        )
    tau = judges_agreement(scored)
    pairs = [{**p, "agreement": tau[p["prompt_id"]]} for p in pairs]
    kept = [p for p in pairs if p["agreement"] >= cfg.min_agreement]
    consistency = {
        "setting": cfg.consistency,
        "min_agreement": cfg.min_agreement,
        # over all prompts, and over the prompts that made a pair before the filter
        "mean_agreement": round(sum(tau.values()) / len(tau), 4) if tau else None,
        "mean_agreement_of_pairs": round(sum(p["agreement"] for p in pairs) / len(pairs), 4) if pairs else None,
        "dropped": len(pairs) - len(kept),
    }
    log.info(
        "judges M%d and M%d agree with mean Kendall tau %s; %d pairs dropped",
        t - 1,
        t - 2,
        consistency["mean_agreement"],
        consistency["dropped"],
    )
    return kept, consistency


if __name__ == "__main__":
    run(main)
