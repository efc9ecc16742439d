"""Looking at models and outputs: evaluation, output checks, the report page, search."""
