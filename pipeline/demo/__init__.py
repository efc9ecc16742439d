"""The synthetic Turkish world of the demo model: scenes, captions, corpus shards."""
