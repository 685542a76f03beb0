"""Huawei Ascend NPUs through the `npu-smi` command-line tool."""
