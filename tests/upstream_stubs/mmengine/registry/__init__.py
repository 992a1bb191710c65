"""mmengine's Registry: named builders, `build(dict(type=NAME, **kwargs))`."""

import importlib


class Registry:
    def __init__(self, name, locations=(), **_ignored):
        self.name, self.locations, self._modules = name, list(locations), {}

    def register_module(self, name=None, force=False, module=None):
        def add(obj):
            for key in [name] if isinstance(name, str) else (name or [obj.__name__]):
                if key in self._modules and not force:
                    raise KeyError(f"{key} is already registered in {self.name}")
                self._modules[key] = obj
            return obj

        return add(module) if module is not None else add

    def get(self, key):
        if key not in self._modules:  # as mmengine: the registry's `locations` register their modules on import
            for location in self.locations:
                importlib.import_module(location)
        return self._modules.get(key)

    def build(self, cfg, **kwargs):
        args = dict(cfg)
        kind = args.pop("type")
        builder = self.get(kind) if isinstance(kind, str) else kind
        if builder is None:
            raise KeyError(f"{kind} is not registered in {self.name}: {sorted(self._modules)}")
        return builder(**args, **kwargs)

    def __contains__(self, key):
        return key in self._modules
