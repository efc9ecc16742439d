"""The captioning run on Ray Data: the chain, its stages, the filter and the commit."""
