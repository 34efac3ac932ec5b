"""Stage 15: the engine's adapter administration. While it serves, an engine can take one more
LoRA adapter or let one go (SGLang's ``/load_lora_adapter`` and ``/unload_lora_adapter``; the HTTP
routes are ``adapter_routes.py``).

``Engine`` inherits these methods from ``LoRAAdmin``, so ``engine.py`` keeps the step loop and the
generation API, and the rules for changing adapters live here: each change holds the engine's
step lock, so no step sees half an adapter; an adapter in use by an unfinished request is not
unloaded; and its cached prefixes go with it.
"""


class LoRAAdmin:
    """Engine methods that change which adapters it serves (mixed into ``Engine``)."""

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> None:
        """Serve one more LoRA adapter (SGLang's /load_lora_adapter); requests may name it at once."""
        with self._lock:
            lora = self._lora_pool()
            if self.workers is not None:
                raise ValueError("adapters are loaded at start-up (lora_paths) when the model is split across ranks")
            lora.register(lora.read(lora_name, lora_path))
            self.lora_paths[lora_name] = str(lora_path)

    def unload_lora_adapter(self, lora_name: str) -> None:
        """Stop serving an adapter; its slot and its cached prefixes are freed. Refused while
        requests that use it run or wait."""
        with self._lock:
            lora = self._lora_pool()
            if self.workers is not None:
                raise ValueError("adapters cannot be unloaded while the model is split across ranks")
            users = [r for r in list(self.scheduler.running) + list(self.scheduler.waiting) if r.lora_path == lora_name]
            if users:
                raise ValueError(f"LoRA adapter {lora_name!r} is used by {len(users)} unfinished requests; "
                                 "unload it once they finish")
            lora.unregister(lora_name)
            del self.lora_paths[lora_name]
            if self.runner.radix_cache is not None:
                self.runner.radix_cache.drop_namespace(lora_name)

    def _lora_pool(self):
        if self.runner is None:
            raise ValueError("this engine was shut down; create a new Engine")
        if self.runner.lora is None:
            raise ValueError("this engine serves no LoRA adapters; start it with lora_paths (or max_lora_rank "
                             "and lora_target_modules, to load adapters later)")
        return self.runner.lora
