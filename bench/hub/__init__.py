"""bench.hub: load test of potluck hub (see __main__)."""
