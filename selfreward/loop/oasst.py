"""Open Assistant's message table turned into the paper's IFT rows and EFT candidates.

The table has one message per row, as `OpenAssistant/oasst1` and `oasst2` publish it: `message_id`,
`parent_id` (null for the prompt that starts a tree), `message_tree_id`, `role` (prompter or
assistant), `text`, `lang`, and, where known, `rank` (the human ranking among sibling replies, 0 =
best, null = unranked), `deleted`, `review_result`, `synthetic`. Other fields are ignored.

The paper's IFT set is the first turn of English conversations with the reply humans ranked first;
its EFT set comes from first-turn prompts with several ranked replies, judged by the SFT model and
kept only where the judge ranks the replies as humans did (scripts/prepare_data.py).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from selfreward.judge.rubric import mean_score, text_before_score_line
from selfreward.run.records import RecordError, read_jsonl

MESSAGE = {
    "message_id": (str,),
    "parent_id": (str, type(None)),
    "message_tree_id": (str,),
    "role": (str,),
    "text": (str,),
    "lang": (str,),
}
OPTIONAL = {
    "rank": (int, type(None)),
    "deleted": (bool, type(None)),
    "review_result": (bool, type(None)),
    "synthetic": (bool, type(None)),
}
ROLES = ("prompter", "assistant")


def check_message(row: dict, where: str) -> None:
    for name, types in {**MESSAGE, **OPTIONAL}.items():
        if name not in row:
            if name in MESSAGE:
                raise RecordError(f"{where}: missing field '{name}'")
            continue
        value = row[name]
        if isinstance(value, float) and int in types and value.is_integer():  # parquet stores ranks as floats
            row[name] = value = int(value)
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise RecordError(
                f"{where}: field '{name}' should be {' or '.join(t.__name__ for t in types)}, got {value!r}"[:300]
            )
    if row["role"] not in ROLES:
        raise RecordError(f"{where}: field 'role' must be prompter or assistant, got {row['role']!r}")


def read_messages(path: str | Path) -> list[dict]:
    """Every message of a local export (.jsonl, .jsonl.gz or .parquet), checked: a bad row is an error
    naming the file, the line (or parquet row) and the field."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # heavy

            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow's own errors name no row
            raise RecordError(f"{path}: not a readable parquet file ({exc})") from None
        for n, row in enumerate(rows, start=1):
            check_message(row, f"{path}: row {n}")
        return rows
    try:
        return read_jsonl(path, MESSAGE, id_field="message_id", check=check_message)
    except (OSError, EOFError) as exc:  # a torn or non-gzip .gz
        raise RecordError(f"{path}: cannot read ({exc})") from None


def first_turns(messages: list[dict], lang: str = "en") -> tuple[list[dict], Counter]:
    """First-turn conversations: a tree's opening prompt and its direct assistant replies.

    Removed, each counted: deleted messages, messages that failed review, synthetic ones, other
    languages, replies whose parent is not in the table or was removed, and every later turn.
    Returns ([{"tree", "prompt_id", "prompt", "replies": [{"message_id", "text", "rank"}]}], counts).
    """
    removed: Counter = Counter()
    known = {m["message_id"] for m in messages}
    kept: dict[str, dict] = {}
    for m in messages:
        if m.get("deleted"):
            removed["deleted"] += 1
        elif m.get("review_result") is False:
            removed["failed_review"] += 1
        elif m.get("synthetic"):
            removed["synthetic"] += 1
        elif m["lang"] != lang:
            removed["not_" + lang] += 1
        else:
            kept[m["message_id"]] = m
    conversations: dict[str, dict] = {}
    for m in kept.values():
        if m["parent_id"] is None and m["role"] == "prompter":
            conversations[m["message_id"]] = {
                "tree": m["message_tree_id"],
                "prompt_id": m["message_id"],
                "prompt": m["text"],
                "replies": [],
            }
    for m in kept.values():
        parent = m["parent_id"]
        if parent is None:
            if m["role"] != "prompter":
                removed["assistant_without_prompt"] += 1
        elif parent not in known:
            removed["missing_parent"] += 1
        elif parent in conversations and m["role"] == "assistant":
            conversations[parent]["replies"].append(
                {"message_id": m["message_id"], "text": m["text"], "rank": m.get("rank")}
            )
        elif parent not in kept:
            removed["parent_removed"] += 1
        else:
            removed["later_turn"] += 1
    result = []
    for conv in conversations.values():
        if conv["replies"]:
            conv["replies"].sort(
                key=lambda r: (r["rank"] is None, r["rank"] if r["rank"] is not None else 0, r["message_id"])
            )
            result.append(conv)
        else:
            removed["prompt_without_reply"] += 1
    result.sort(key=lambda c: c["prompt_id"])
    return result, removed


def ift_rows(conversations: list[dict]) -> tuple[list[dict], Counter]:
    """One IFT row per prompt: the reply humans ranked first (rank 0). Several rank-0 replies (a tie)
    give the one with the smallest message id; a prompt with no rank-0 reply gives none."""
    rows, counts = [], Counter()
    for conv in conversations:
        best = [r for r in conv["replies"] if r["rank"] == 0]
        if not best:
            counts["no_rank_0_reply"] += 1
            continue
        if len(best) > 1:
            counts["rank_0_tie"] += 1
        rows.append({"id": f"oasst-{conv['prompt_id']}", "prompt": conv["prompt"], "completion": best[0]["text"]})
    return rows, counts


def eft_candidates(conversations: list[dict]) -> list[dict]:
    """Prompts with at least two replies of different human rank: what the judge is asked to rank."""
    out = []
    for conv in conversations:
        ranked = [r for r in conv["replies"] if r["rank"] is not None]
        if len({r["rank"] for r in ranked}) >= 2:
            out.append({**conv, "replies": ranked})
    return out


def ranking_agrees(ranks: list[int], scores: list[float | None]) -> bool:
    """Whether the judge orders every two replies of different human rank as humans did (a lower rank
    is better, so it needs a strictly higher score). A reply the judge gave no score fails it."""
    if any(s is None for s in scores):
        return False
    for i in range(len(ranks)):
        for j in range(len(ranks)):
            if ranks[i] < ranks[j] and not scores[i] > scores[j]:
                return False
    return True


def is_eval_question(question: str, fraction: float, seed: int) -> bool:
    """Whether a question goes to the EFT eval split: a hash of the seed and its text, so the split does
    not depend on the file's order, and a question asked in several trees goes one way only."""
    digest = hashlib.sha256(f"{seed}\x00{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def eft_rows(conv: dict, judged: list[list[dict]], rubric) -> list[dict]:
    """The EFT rows of one prompt whose ranking the judge got right: one per reply, with the judgment
    closest to the judge's mean score as the justification, its score line written "Score: N" (the
    data format; SFT rewrites it the way the run's template shows it)."""
    rows = []
    for reply, judgments in zip(conv["replies"], judged, strict=True):
        valid = [j for j in judgments if j["score"] is not None]
        mean = mean_score([j["score"] for j in valid])
        pick = min(valid, key=lambda j: abs(j["score"] - mean))
        score = int(round(pick["score"]))
        body = text_before_score_line(pick["text"], rubric).strip()
        rows.append(
            {
                "id": f"oasst-{reply['message_id']}",
                "prompt": conv["prompt"],
                "response": reply["text"],
                "score": score,
                "justification": f"{body}\nScore: {score}" if body else f"Score: {score}",
                "human_rank": reply["rank"],
                "judge_mean": mean,
            }
        )
    return rows


# Ranked first-turn replies (best first) for sample_messages: short, plain, in the table's format.
_SAMPLE_TREES = (
    (
        "How do I keep fresh basil from wilting?",
        (
            "Trim the stems and stand the bunch in a glass of water on the counter, loosely covered with a bag. "
            "Basil dislikes the cold, so keep it out of the fridge and change the water every day or two.",
            "Put it in a glass of water.",
            "Basil is a herb.",
        ),
    ),
    (
        "What is the difference between weather and climate?",
        (
            "Weather is the state of the atmosphere at a given place and time: today's rain or tomorrow's heat. "
            "Climate is the pattern of weather over decades, such as a region's average temperature and rainfall.",
            "Weather is short term and climate is long term.",
            "They are the same thing.",
        ),
    ),
    (
        "Why is the sky blue?",
        (
            "Sunlight is scattered by the molecules of the air, and short wavelengths scatter far more than long "
            "ones (Rayleigh scattering). Blue light is therefore scattered across the whole sky and reaches our "
            "eyes from every direction.",
            "Because of how air scatters sunlight.",
            "Because the sea reflects onto it.",
        ),
    ),
    (
        "Give me three tips for sleeping better.",
        (
            "1. Go to bed and get up at the same times every day. 2. Keep the bedroom dark, quiet and cool. "
            "3. Avoid caffeine after midday and screens in the last hour before bed.",
            "Sleep more and drink less coffee.",
        ),
    ),
    (
        "What is a hash table?",
        (
            "A hash table stores key-value pairs in an array. A hash function turns each key into an index, so a "
            "lookup, insert or delete takes constant time on average; collisions are handled by chaining or probing.",
            "A table that uses hashes to find things.",
            "A kind of furniture.",
        ),
    ),
)


def sample_messages() -> list[dict]:
    """A small message table in Open Assistant's format, for prepare_data.py --dry-run without --source:
    first-turn prompts with ranked replies, and one message for each filter (deleted, failed review,
    synthetic, another language, a later turn)."""
    rows = []

    def add(message_id, parent_id, tree, role, text, rank=None, lang="en", **flags):
        rows.append(
            {
                "message_id": message_id,
                "parent_id": parent_id,
                "message_tree_id": tree,
                "role": role,
                "text": text,
                "lang": lang,
                "rank": rank,
                "deleted": flags.get("deleted", False),
                "review_result": flags.get("review_result", True),
                "synthetic": flags.get("synthetic", False),
            }
        )

    for n, (prompt, replies) in enumerate(_SAMPLE_TREES, start=1):
        add(f"p{n}", None, f"t{n}", "prompter", prompt)
        for rank, reply in enumerate(replies):
            add(f"p{n}r{rank}", f"p{n}", f"t{n}", "assistant", reply, rank)
    add("p1x", "p1r0", "t1", "prompter", "And how long does it keep that way?")  # a later turn
    add("p1r9", "p1", "t1", "assistant", "A reply its author deleted.", deleted=True)
    add("p2r9", "p2", "t2", "assistant", "A reply reviewers rejected.", review_result=False)
    add("p3r9", "p3", "t3", "assistant", "A machine-written reply.", synthetic=True)
    add("p9", None, "t9", "prompter", "Wie spät ist es in Tokio?", lang="de")
    add("p9r0", "p9", "t9", "assistant", "Tokio ist Berlin sieben oder acht Stunden voraus.", 0, lang="de")
    return rows
