"""llm-observe client SDK (skeleton).

The public API of instrumentation-sdk 1.8.1 (see shared/seed-api.md) lands here
with the SDK issue; this package currently only reserves the import name and the
`llm-observe` console script. It imports nothing from the server.
"""

__version__ = "2.0.0.dev0"
