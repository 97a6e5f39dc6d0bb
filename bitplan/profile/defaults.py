"""The profile's default settings (no heavy imports: the CLI reads them for its help text)."""

# Defaults sized so that a default profile of the default model takes under 30 minutes on 2 CPU cores, most of it
# spent on calibration (README, "Choosing the profile's defaults"): adaptive rounding keeps improving with
# calibration tokens, while α_noise from one window already ranks layers like α_hessian does.
# Per-token factor samples (T' = 1): at the default 64K tokens they beat chunks of 32 (mean KL, int3-g128 on every
# layer: YAQA raw 0.612 against 0.625, H_O shrunk 0.578 against 0.588), as at 8K, and cost less to accumulate
# (README, "Choosing the profile's defaults"); plain sketch B (T' = seqlen) lost at every size tried.
DEFAULT_CHUNK = 1
DEFAULT_SAMPLES = 256
DEFAULT_SEQLEN = 256
DEFAULT_NOISE_SAMPLES = 1
# How the calibration windows are split into the two halves that choose λ and cross-fit the forecasts: "random"
# (seeded) or "contiguous" (the windows from the first half of the source against those from the second). A judge
# from another part of the text is less like the fitted text, as the user's text is: at the default 64K tokens,
# sotu (1790-2021 in order), contiguous halves chose more shrinkage and measured int3 YAQA auto 0.531 against
# 0.545 on WikiText, with forecasts nearer the measured ratios (README, "Choosing the profile's defaults").
HALF_SPLITS = ("random", "contiguous")
DEFAULT_HALVES = "contiguous"
# The judge from the model's own samples (profile/judge.py): 64 windows (16K tokens at the default seqlen), the
# number measured. It is the forecast to read for text unlike the calibration (README), so it is on by default for
# every model that names a BOS or EOS token to start the samples from; the default profile with it stays inside
# its 30 minutes since the rotations and the format errors were sped up (README, "Choosing the profile's defaults").
DEFAULT_JUDGE_SAMPLES = 64
# The embedding's and head's α_hessian (profile/outer.py) takes one forward/backward per window with the whole
# matrix's gradient (a tied or large vocabulary's is the largest tensor in the model): the first 32 windows (8K
# tokens at the default seqlen) estimate its per-token mean, as α_noise's single window does, at an eighth of a
# pass over the default calibration.
DEFAULT_OUTER_WINDOWS = 32
