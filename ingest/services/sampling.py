"""Sampling: the rule is shared with the SDK, so a client and the appliance always agree."""

from instrumentation_sdk.sampling import should_sample

__all__ = ["should_sample"]
