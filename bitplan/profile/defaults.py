"""The profile's default settings (no heavy imports: the CLI reads them for its help text)."""

# Defaults sized so that a default profile of the default model takes under 30 minutes on 2 CPU cores, most of it
# spent on calibration (README, "Choosing the profile's defaults"): adaptive rounding keeps improving with
# calibration tokens, while α_noise from one window already ranks layers like α_hessian does.
# Chunks of 32 tokens: DESIGN.md's prototype found chunks of 32 and per-token equal within noise at 8K tokens and
# chunks of 32 best at 32K tokens (0.76 × LDLQ); plain sketch B (T' = seqlen) lost at every size tried.
DEFAULT_CHUNK = 32
DEFAULT_SAMPLES = 256
DEFAULT_SEQLEN = 256
DEFAULT_NOISE_SAMPLES = 1
