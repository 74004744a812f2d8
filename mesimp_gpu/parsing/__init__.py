"""A Chen & Manning (2014) greedy transition parser's model-independent parts: the arc-standard system
and its oracle, the 48 features, batched greedy decoding and attachment scores."""
