"""Imports every command module so that each registers itself on the app."""
from . import eval_cmd  # noqa: F401
from . import profile_cmd  # noqa: F401
from . import apply_cmd  # noqa: F401
from . import formats_cmd  # noqa: F401
from . import solve_cmd  # noqa: F401
from . import export_cmd  # noqa: F401
