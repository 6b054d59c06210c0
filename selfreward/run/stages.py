"""What a stage is: the stages of each algorithm's iteration, the file each writes, the config each reads.

A stage's name is its script's in scripts/ (00_sft.py ...); 00_sft runs once, before the iterations.
"""

# The stages of one iteration, per `algorithm`; every algorithm starts from 00_sft's M0.
ITERATION_STAGES = {
    "srlm": ("01_gen_prompts", "02_gen_responses", "03_gen_scores", "04_gen_preferences", "05_dpo", "06_eval"),
    "spin": ("01_sft_prompts", "02_gen_responses", "04_spin_pairs", "05_dpo", "06_eval"),
    "raft": ("01_sft_prompts", "02_gen_responses", "03_gen_scores", "04_raft_select", "05_raft_sft", "06_eval"),
}

# The JSONL file each generating stage writes (M<t-1>/generated/<name>.jsonl: see layout.RunLayout.generated).
GENERATED = {
    "01_gen_prompts": "prompts",
    "01_sft_prompts": "prompts",
    "02_gen_responses": "responses",
    "03_gen_scores": "scores",
    "04_gen_preferences": "preferences",
    "04_spin_pairs": "preferences",
    "04_raft_select": "selected",
}

# The config sections (or single keys, "section.key") each stage's output depends on: changing
# anything else does not redo it.
CONFIG_SECTIONS = {
    "00_sft": ("seed", "data", "model", "lora", "sft", "judge.format", "judge.template", "judge.score_pattern"),
    "01_gen_prompts": ("seed", "model", "generation", "prompts"),
    "01_sft_prompts": ("seed", "algorithm", "spin.num_prompts", "raft.num_prompts"),
    "02_gen_responses": ("seed", "model", "generation", "responses", "algorithm", "raft.samples_per_prompt"),
    "03_gen_scores": ("seed", "model", "generation", "judge", "eval.bootstrap_samples", "preferences.consistency"),
    "04_gen_preferences": ("preferences", "judge.gate"),
    "04_spin_pairs": (),
    "04_raft_select": ("raft",),
    "05_dpo": ("seed", "model", "lora", "dpo"),
    "05_raft_sft": ("seed", "model", "lora", "sft", "raft.epochs"),
    "06_eval": ("seed", "model", "generation", "judge", "eval"),
}

# Keys of those sections that do not change a stage's output (the gate only decides whether to go on).
NOT_FINGERPRINTED = {"03_gen_scores": ("judge.gate",), "06_eval": ("judge.gate",)}

# Keys that only stage 00 reads: every later stage loads M<t-1> from the run folder instead.
BASE_MODEL_KEYS = ("model.name_or_path", "model.fallback_chat_template")
