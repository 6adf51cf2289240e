def sampler_step(*args, **kwargs):  # placeholder until the op lands
    raise NotImplementedError
