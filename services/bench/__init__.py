"""``needle bench``: benchmarks reported as ratios to a baseline measured in the same run, on the
same machine (a bare FastAPI app for intake, raw JetStream consume+publish for the router).

Absolute numbers depend on the machine; the ratios are what to compare between runs."""
