"""The diffusion samplers' names, in one place and without numpy: plugins list them as option choices at import,
the schedulers (engine/diffusion/schedulers) implement them, the A1111-compatible API speaks A1111's names."""

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a")
# AUTOMATIC1111's names for them (its `parameters` PNG chunk and its API)
A1111_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
               "euler": "Euler", "euler_a": "Euler a"}
