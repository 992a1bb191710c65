"""No caching (the reference every method is compared to), and fewer sampling steps, which is a sampler setting.

`steps` is kept as a name so that `--cache steps` keeps working: it caches nothing and asks the sampler for
`num_steps` steps (`sampler_settings()`); benchmarks treat it as a variant (cache config + sampler settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import CacheConfig, check_field
from ..policy import CachePolicy, Sample


@dataclass
class NoneConfig(CacheConfig):
    """No caching: the plugin stays out of the way (the reference the others are compared to)."""

    method: ClassVar[str] = "none"

    def make_policy(self, sample: Sample) -> CachePolicy:
        return CachePolicy(self, sample)


@dataclass
class StepsConfig(NoneConfig):
    """Fewer sampling steps, no caching: the sampler runs `num_steps` steps."""

    method: ClassVar[str] = "steps"
    num_steps: int = 12

    def validate(self) -> None:
        check_field(
            isinstance(self.num_steps, int) and self.num_steps >= 1,
            self.method,
            "num_steps",
            "int >= 1",
            self.num_steps,
        )

    def sampler_settings(self) -> dict[str, Any]:
        return {"num_sampling_steps": self.num_steps}


METHODS = (NoneConfig, StepsConfig)
