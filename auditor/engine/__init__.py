"""The audit engine, in the order data flows: find and expose layers, run, feed, count, tally, metrics, summary."""
