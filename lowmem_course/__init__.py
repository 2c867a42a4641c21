"""lowmem_course: the companion package of the lowmem-course notebooks.

Fit the DeepSeek-R1 family into memory, from R1-Distill-Qwen-1.5B to the 671B mixture-of-experts.
Modules, bottom to top: ``units``, ``family`` (configs, tiny twins, loading), ``steps``,
``measure`` and ``estimate`` (independent of each other), the technique modules, ``plots``,
``lab`` (the notebooks' setup) and ``cli`` (the ``lowmem`` command).
"""

__version__ = "0.1.0"
REPO_URL = "https://github.com/lowmem-course/lowmem-course"  # the one place the repository lives
