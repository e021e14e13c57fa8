"""A Great Expectations 1.x suite over the statistics tables (pandas; GX has no polars source)."""

from __future__ import annotations

import polars as pl


def _suite(gx, per_dim_rows: int):
    e = gx.expectations
    return {
        "per_dim": [
            e.ExpectTableRowCountToEqual(value=per_dim_rows),
            e.ExpectColumnValuesToNotBeNull(column="mean"),
            e.ExpectColumnValuesToNotBeNull(column="variance"),
            e.ExpectColumnValuesToBeBetween(column="variance", min_value=0, strict_min=True),
            e.ExpectColumnPairValuesAToBeGreaterThanB(column_A="max", column_B="min", or_equal=True),
            e.ExpectColumnPairValuesAToBeGreaterThanB(column_A="q99", column_B="q01", or_equal=True),
        ],
        "summary": [
            e.ExpectColumnValuesToBeBetween(column="tokens", min_value=1),
            e.ExpectColumnValuesToBeBetween(column="nonfinite_tokens", min_value=0, max_value=0),
            e.ExpectColumnValuesToBeBetween(column="mean_token_norm", min_value=0, strict_min=True),
        ],
    }


def run_suite(tables: dict[str, pl.DataFrame]) -> tuple[bool, pl.DataFrame]:
    """Validate the per-dimension and summary tables; returns (success, one row per expectation)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # results go to metadata
    source = context.data_sources.add_pandas("activation_stats")
    rows = []
    for table_name, expectations in _suite(gx, len(tables["per_dim"])).items():
        batch = source.add_dataframe_asset(table_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"activation_stats.{table_name}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate.{table_name}", data=batch, suite=suite)
        )
        result = validation.run(batch_parameters={"dataframe": tables[table_name].to_pandas()})
        for item in result.results:
            config = item.expectation_config
            assert config is not None  # GX sets it on every result of a suite's validation
            rows.append(
                {
                    "table": table_name,
                    "expectation": config.type,
                    "column": str(config.kwargs.get("column") or config.kwargs.get("column_A") or ""),
                    "success": bool(item.success),
                    "unexpected": int(item.result.get("unexpected_count") or 0),
                    "examples": str(item.result.get("partial_unexpected_list", [])[:3]),
                }
            )
    report = pl.DataFrame(rows)
    return bool(report["success"].all()), report
