"""Sensitivity profiles: Kronecker-factored Hessians, linearity coefficients, the sensitivity report.

    from bitplan.profile import profile_model, load_profile
    profile = profile_model("smollm2-135m", "sotu", samples=128, seqlen=256, out_dir="profiles/x")
"""
from .hessians import LayerFactors, load_factors
from .relerr import rotation_seeds
from .run import default_out_dir, profile_model
from .schema import LayerRecord, Profile, load_profile

__all__ = ["profile_model", "default_out_dir", "Profile", "LayerRecord", "load_profile", "load_factors",
           "LayerFactors", "rotation_seeds"]
