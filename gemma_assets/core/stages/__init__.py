"""The work of each asset, as plain functions: they read inputs through a RunLayout, write their
outputs through it, and return a typed record for the asset to report. No Dagster here."""
