"""The built-in model configs (config.json fields as YAML), installed as dsv3.configs."""
