"""mmengine's Config for plain Python config files: top-level names, dicts readable as attributes."""

import runpy
import types


class ConfigDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, ConfigDict) else v for k, v in self.items()}


def _wrap(value):
    if isinstance(value, dict):
        return ConfigDict({k: _wrap(v) for k, v in value.items()})
    return value


class Config(ConfigDict):
    @staticmethod
    def fromfile(path):
        names = runpy.run_path(str(path))
        keep = {k: v for k, v in names.items() if not k.startswith("__") and not isinstance(v, types.ModuleType)}
        return Config(_wrap(keep))
