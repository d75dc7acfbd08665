"""Data: every loader returns numpy batches; nothing here touches the network."""
