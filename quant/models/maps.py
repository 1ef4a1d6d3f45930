class ParametricMaps: pass
def parametric_maps(*a, **k): raise NotImplementedError
