"""pandas: Open-Sora reads csv/parquet data lists with it (training and VBench only), not used by the tests."""


def read_csv(*_args, **_kwargs):
    raise NotImplementedError("pandas stand-in: read_csv is not available in the tests")


read_parquet = read_csv
