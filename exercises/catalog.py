"""Every exercise: which stage file it changes, how, and which tests judge it.

``find`` is text that occurs exactly once in the stage's file; the scratch
copy gets ``replace`` instead. The answer is the stage's own code, so putting
``find`` back solves the exercise (CI checks both ways: with the change the
tests fail, without it they pass).
"""

from dataclasses import dataclass

BREAK, BUILD = "break it", "build it"


@dataclass(frozen=True)
class Exercise:
    stage: str
    number: int
    kind: str
    title: str
    task: str
    file: str  # inside the stage folder
    find: str
    replace: str
    tests: tuple[str, ...]  # pytest node ids, run against the scratch copy


PAGING = "tests/stage02_paged/test_paging.py::"
RADIX = "tests/stage03_radix/test_radix_tree.py::"
CHUNKED = "tests/stage05_chunked/test_chunked_prefill.py::"
TENSOR_PARALLEL = "tests/stage07_tp/test_tensor_parallel.py::"
EXPERTS = "tests/stage08_ep/test_expert_parallel.py::"
GRAPHS = "tests/stage09_cuda_graph/test_cuda_graph.py::"
TOOLS = "tests/server/test_tool_parser.py::"
RUNS = "tests/stage12_inplace_attention/test_page_runs.py::"
RUN_ALLOCATOR = "tests/stage12_inplace_attention/test_page_allocator.py::"
SPECULATIVE = "tests/stage14_speculative/test_speculative.py::"
SPEC_SAMPLING = "tests/stage14_speculative/test_spec_sampling_and_storm.py::"
LORA = "tests/stage15_lora/test_lora.py::"
ROUTER = "tests/stage16_data_parallel/test_router.py::"
HICACHE = "tests/stage17_hicache/test_hicache.py::"
HANDOVER = "tests/stage18_pd_disaggregation/test_handover.py::"
PIPELINE = "tests/stage19_pipeline_parallel/test_pipeline_parallel.py::"
LANG = "tests/lang/test_lang.py::"

EXERCISES = [
    Exercise(
        "stage01_core", 1, BREAK, "attention that misses the newest key",
        "Each sequence now attends over all its keys but the newest. Which test catches it, and "
        "against what? Why does a decode step need its own token's key?",
        "kv_cache.py",
        "q[offset : offset + n], cache.k[layer_index, :end], cache.v[layer_index, :end]",
        "q[offset : offset + n], cache.k[layer_index, : end - 1], cache.v[layer_index, : end - 1]",
        ("tests/ladder/test_parity.py::test_batch_greedy_equals_transformers[stage01_core-dense]",),
    ),
    Exercise(
        "stage01_core", 2, BUILD, "write the new keys and values",
        "ContiguousAttention no longer stores the step's keys and values. Write each sequence's new k "
        "and v into its cache at positions start .. end of this layer, before attending.",
        "kv_cache.py",
        "            cache.k[layer_index, start:end] = k[offset : offset + n]\n"
        "            cache.v[layer_index, start:end] = v[offset : offset + n]\n",
        '            raise NotImplementedError("exercise: store this step\'s keys and values in the cache")\n',
        ("tests/ladder/test_parity.py::test_batch_greedy_equals_transformers[stage01_core-dense]",),
    ),
    Exercise(
        "stage02_paged", 1, BREAK, "a page that never comes back",
        "Freed pages are no longer returned to the pool. Run the check: which test fails, and what "
        "invariant does it state? Find the line in page_allocator.py and put it right.",
        "page_allocator.py",
        "            self.in_use.remove(page)\n            self.free_list.append(page)\n",
        "            self.in_use.remove(page)\n",
        (PAGING + "test_allocator_never_hands_out_a_page_twice_and_gets_every_page_back",),
    ),
    Exercise(
        "stage02_paged", 2, BUILD, "hand out pages",
        "PageAllocator.alloc_pages has lost its body. Take `count` pages from the free list (low ids "
        "first), mark them in use and return them; the check says when the allocator is whole again.",
        "page_allocator.py",
        "        pages = [self.free_list.pop() for _ in range(count)]\n        self.in_use.update(pages)\n        return pages\n",
        '        raise NotImplementedError("exercise: take count pages from the free list and mark them in use")\n',
        (PAGING + "test_allocator_never_hands_out_a_page_twice_and_gets_every_page_back",
         PAGING + "test_freeing_a_page_twice_is_caught"),
    ),
    Exercise(
        "stage03_radix", 1, BREAK, "evicting a prefix someone is using",
        "Eviction now looks at every leaf. Which test catches it? What would a running request see "
        "if the pages under its prefix were handed to another request?",
        "radix_cache.py",
        "if not n.children and n.lock_ref == 0]",
        "if not n.children]",
        (RADIX + "test_eviction_never_frees_a_locked_node",),
    ),
    Exercise(
        "stage03_radix", 2, BREAK, "evicting the newest prefix first",
        "Eviction now frees the most recently used leaves first. Which test catches it? Which "
        "requests would lose their cached prefix, and what would that cost?",
        "radix_cache.py",
        "        leaves = [(n.last_access, id(n), n)",
        "        leaves = [(-n.last_access, id(n), n)",
        (RADIX + "test_evicts_least_recently_used_unlocked_leaf",),
    ),
    Exercise(
        "stage04_batching", 1, BREAK, "an abort that keeps its pages",
        "Aborting a running request no longer releases its pages. Which test notices, and how would "
        "a server with clients that disconnect end up?",
        "scheduler.py",
        "            self.running.remove(request)\n            self.runner.free_cache(request)\n",
        "            self.running.remove(request)\n",
        ("tests/stage04_batching/test_continuous_batching.py::test_abort_by_id_releases_pages_and_others_continue",),
    ),
    Exercise(
        "stage04_batching", 2, BUILD, "retract until decode fits",
        "Scheduler._retract_until_decode_fits has lost its body. While the next decode step needs more "
        "pages than the pool has free, take the running request with the fewest generated tokens (ties: "
        "the longest prompt), release its pages, reset its num_cached and put it at the front of the "
        "queue; count it in num_retractions and reset new_token_ratio.",
        "scheduler.py",
        "        while self.runner.decode_pages_needed(self.running) > self.runner.available_pages():\n"
        "            # Least progress first: fewest generated tokens, then the longest prompt (cheapest to redo last).\n"
        "            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.prompt_ids)))\n"
        "            self.running.remove(victim)\n"
        "            self.runner.free_cache(victim)\n"
        "            victim.num_cached = 0\n"
        "            self.waiting.appendleft(victim)\n"
        "            self.num_retractions += 1\n"
        "            self.new_token_ratio = INIT_NEW_TOKEN_RATIO\n",
        '        raise NotImplementedError("exercise: retract the least-advanced requests until decode fits")\n',
        ("tests/stage04_batching/test_continuous_batching.py::test_a_small_pool_forces_retraction_and_every_request_still_finishes_correctly",),
    ),
    Exercise(
        "stage05_chunked", 1, BREAK, "a new prompt fed whole",
        "A newly admitted prompt is no longer cut to what is left of the chunk budget. Which test "
        "fails, and what does chunking bound that this loses?",
        "scheduler.py",
        "                for request in self._admit_prefill(budget, whole_prompts=False):\n"
        "                    n = min(request.seq_len - request.num_cached, budget)\n",
        "                for request in self._admit_prefill(budget, whole_prompts=False):\n"
        "                    n = request.seq_len - request.num_cached\n",
        ("tests/stage05_chunked/test_chunked_prefill.py::test_peak_activation_of_a_prefill_step_is_bounded_by_the_chunk",),
    ),
    Exercise(
        "stage05_chunked", 2, BREAK, "decoders that wait for a long prompt",
        "A step now carries prompt chunks or decodes, never both. Every request still gets its "
        "tokens: which test fails, and what would a user streaming a reply see while someone sends "
        "a long prompt?",
        "scheduler.py",
        "            work = decode + chunks\n",
        "            work = chunks or decode\n",
        (CHUNKED + "test_a_long_prompt_is_cut_into_chunks_and_decoders_keep_going",),
    ),
    Exercise(
        "stage06_scheduling", 1, BREAK, "longest output last",
        "The lof policy now sorts the wrong way. Which test catches it? Why would anyone run the "
        "longest outputs first?",
        "schedule_policy.py",
        "key=lambda r: -r.params.max_tokens",
        "key=lambda r: r.params.max_tokens",
        ("tests/stage06_scheduling/test_schedule_policy.py::test_lof_puts_the_longest_output_first_and_keeps_ties_in_order",),
    ),
    Exercise(
        "stage06_scheduling", 2, BREAK, "no request is ever starving",
        "The starvation guard no longer moves anyone to the front. Which policy lets a short "
        "request wait forever, and which test shows it? What bound should a user be able to count on?",
        "scheduler.py",
        "        starving = [r for r in self.waiting if r.waiting_steps >= STARVATION_STEPS]\n"
        "        rest = [r for r in self.waiting if r.waiting_steps < STARVATION_STEPS]\n",
        "        starving, rest = [], list(self.waiting)\n",
        ("tests/stage06_scheduling/test_schedule_policy.py::test_no_request_starves_behind_a_stream_of_favoured_ones",),
    ),
    Exercise(
        "stage06_scheduling", 3, BREAK, "twins that never wait",
        "A request that shares a long uncached prefix with one admitted in the same step no longer "
        "waits for it. The tokens stay right: which test still fails, and what does it count?",
        "scheduler.py",
        "            if shared - cached >= IN_BATCH_PREFIX_TOKENS:\n",
        "            if False:\n",
        ("tests/stage06_scheduling/test_schedule_policy.py::test_in_batch_sharing_computes_a_shared_uncached_prefix_once[fcfs]",),
    ),
    Exercise(
        "stage07_tp", 1, BREAK, "row-parallel layers that forget to add up",
        "RowParallelLinear no longer sums its partial outputs across ranks. With tp_size=2, what "
        "does each rank's o_proj and down_proj now return? Which test catches it, and how far off "
        "are the logits?",
        "parallel.py",
        "        if self.reduce:\n            all_reduce(out)\n",
        "",
        (TENSOR_PARALLEL + "test_tp2_gives_tp1_tokens_and_close_logits[dense]",),
    ),
    Exercise(
        "stage07_tp", 2, BUILD, "this rank's columns of o_proj",
        "TensorParallelShard.read_slice no longer knows how to cut o_proj. It is row-parallel: its "
        "input is this rank's attention heads. Return the columns of those heads.",
        "parallel.py",
        "            return lazy[:, r * self.heads * d : (r + 1) * self.heads * d]\n",
        '            raise NotImplementedError("exercise: the o_proj columns of this rank\'s heads")\n',
        (TENSOR_PARALLEL + "test_tp2_gives_tp1_tokens_and_close_logits[dense]",),
    ),
    Exercise(
        "stage08_ep", 1, BREAK, "experts that stay on their rank",
        "The routed experts' outputs are no longer summed across the expert-parallel ranks. Each "
        "rank now adds only the experts it holds. Which test fails? Why are the dense layers fine?",
        "parallel.py",
        "                    layer.mlp.reduce_routed = all_reduce\n",
        "",
        (EXPERTS + "test_ep2_gives_the_same_tokens_with_experts_busy_on_both_ranks[1-2-moe]",),
    ),
    Exercise(
        "stage08_ep", 2, BUILD, "the experts that live on this rank",
        "TensorParallelShard no longer knows which experts are this rank's. With ep_size N, rank r "
        "holds a contiguous block of E / N experts: set self.local_experts to that range.",
        "parallel.py",
        "        self.local_experts = range(self.rank * experts_per_rank, (self.rank + 1) * experts_per_rank)\n",
        '        raise NotImplementedError("exercise: this rank\'s block of E / ep_size experts")\n',
        (EXPERTS + "test_each_rank_holds_half_the_expert_weights",
         EXPERTS + "test_ep2_gives_the_same_tokens_with_experts_busy_on_both_ranks[1-2-moe]"),
    ),
    Exercise(
        "stage09_cuda_graph", 1, BUILD, "the batch sizes that get a graph",
        "batch_buckets has lost its body. Return SGLang's sizes: 1, 2, 4, 8, then every 8 up to "
        "max_bs, and max_bs itself always.",
        "cuda_graph_runner.py",
        "    sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_bs] + list(range(16, max_bs + 1, 8))\n"
        "    return sizes if sizes[-1] == max_bs else sizes + [max_bs]\n",
        '    raise NotImplementedError("exercise: 1, 2, 4, 8, then every 8 up to max_bs")\n',
        (GRAPHS + "test_batch_buckets_follow_sglang",),
    ),
    Exercise(
        "stage09_cuda_graph", 2, BREAK, "a key bucket twice too big",
        "key_bucket still holds every key, yet a test fails. Which one, and what would the bigger "
        "buckets cost on a GPU?",
        "cuda_graph_runner.py",
        "1 << (num_keys - 1).bit_length()",
        "1 << num_keys.bit_length()",
        (GRAPHS + "test_key_buckets_are_powers_of_two_that_hold_every_key",),
    ),
    Exercise(
        "stage10_overlap", 1, BREAK, "a placeholder one token off",
        "The device now resolves placeholder -1 - j to the sampled token j + 1. Which test fails? "
        "What would a user see?",
        "model_runner.py",
        "self.last_sampled[(-1 - ids).clamp(min=0)]",
        "self.last_sampled[(-ids).clamp(min=0, max=len(self.last_sampled) - 1)]",
        ("tests/stage10_overlap/test_overlap.py::test_overlap_gives_stage09_tokens[dense]",),
    ),
    Exercise(
        "stage10_overlap", 2, BREAK, "the token after the stop",
        "A request that finished on a stop token or string now keeps the token its next step, "
        "already launched, sampled. Which test fails? Why does overlap launch that step at all?",
        "engine.py",
        "            if not request.finished:\n                request.append_token(token)\n",
        "            request.append_token(token)\n",
        ("tests/stage10_overlap/test_overlap.py::test_stop_rules_never_overshoot",),
    ),
    Exercise(
        "stage11_server", 1, BREAK, "parallel_tool_calls ignored",
        "A reply keeps every tool call even when the request says parallel_tool_calls: false. "
        "Which test catches it? Where else would a client notice?",
        "openai_choices.py",
        "return content, calls if self.request.parallel_tool_calls else calls[:1]",
        "return content, calls",
        ("tests/server/test_openai_api.py::test_parallel_tool_calls_false_keeps_the_first_call[stage11_server]",),
    ),
    Exercise(
        "stage11_server", 2, BUILD, "stream everything but a tool call",
        "streamable_length has lost its body. A streamed chat reply sends its content as it grows, "
        "but nothing from a <tool_call> on (calls arrive whole at the end). Return how much of the "
        "text may go now: up to the first <tool_call>, and never a tail that could still grow into one.",
        "tool_parser.py",
        "    found = text.find(START)\n"
        "    if found >= 0:\n"
        "        return found\n"
        "    for size in range(min(len(START) - 1, len(text)), 0, -1):\n"
        "        if START.startswith(text[-size:]):\n"
        "            return len(text) - size\n"
        "    return len(text)\n",
        '    raise NotImplementedError("exercise: the length of text that cannot be part of a tool call")\n',
        (TOOLS + "test_a_stream_holds_back_only_what_could_begin_a_tool_call[stage11_server]",),
    ),
    Exercise(
        "stage12_inplace_attention", 1, BREAK, "a merge that forgets the log-sum-exps",
        "merge_runs now weighs every run the same. Which layouts still give the right answer, and "
        "why? Put the weights right.",
        "page_runs.py",
        '    weights = lse.to(wide).masked_fill(empty, float("-inf")).softmax(dim=1)\n',
        '    weights = torch.zeros_like(lse, dtype=wide).masked_fill(empty, float("-inf")).softmax(dim=1)\n',
        (RUNS + "test_runs_and_merge_equal_attention_over_gathered_keys",),
    ),
    Exercise(
        "stage12_inplace_attention", 2, BUILD, "a page table read as runs",
        "extend_runs has lost its body. Append each page to the last run when it follows that run's "
        "last page, else start a new run [page, 1].",
        "page_runs.py",
        "    for page in pages:\n        if runs and runs[-1][0] + runs[-1][1] == page:\n"
        "            runs[-1][1] += 1\n        else:\n            runs.append([page, 1])\n",
        '    raise NotImplementedError("exercise: extend the last run or start a new one, page by page")\n',
        (RUNS + "test_a_page_table_reads_as_runs_of_consecutive_pages",
         RUNS + "test_runs_and_merge_equal_attention_over_gathered_keys"),
    ),
    Exercise(
        "stage12_inplace_attention", 3, BREAK, "new runs at the start of a free stretch",
        "New runs now start at the beginning of the largest free stretch. Which tests fail? Serve "
        "eight requests and print their runs: what happens to them as they grow?",
        "page_allocator.py",
        "        return start + max(length - wanted, 0) // 2\n",
        "        return start\n",
        (RUN_ALLOCATOR + "test_new_runs_start_in_the_middle_of_the_largest_free_stretch",
         RUN_ALLOCATOR + "test_a_request_grows_in_one_run_while_others_grow_beside_it"),
    ),
    Exercise(
        "stage13_structured", 1, BREAK, "a grammar nobody enforces",
        "The masks are no longer applied before sampling. Run the check: where does it fail, and "
        "why there rather than at a validator?",
        "model_runner.py",
        "            apply_grammar_masks(logits, [requests[i].grammar for i in complete])\n",
        "            pass\n",
        ("tests/stage13_structured/test_structured.py::test_the_masks_alone_keep_a_random_model_in_its_grammar",),
    ),
    Exercise(
        "stage13_structured", 2, BUILD, "unpack the mask bits",
        "apply_grammar_masks has lost the line that turns the packed masks into one bool per token. "
        "llguidance packs 32 tokens in each int32 word: token 32 w + b is allowed when bit b of word w "
        "is 1. Make allowed [rows, vocab] with a shift and a mask, no Python loop.",
        "grammar.py",
        "    allowed = ((masks[:, :, None] >> bits) & 1).view(len(rows), -1)[:, :vocab].bool()  # [rows, vocab]\n",
        '    raise NotImplementedError("exercise: one bool per token from the 32-bit mask words")\n',
        ("tests/stage13_structured/test_structured.py::test_the_masks_alone_keep_a_random_model_in_its_grammar",),
    ),
    Exercise(
        "stage14_speculative", 1, BREAK, "greedy acceptance",
        "A guess is now kept exactly when it is the target's favourite token. Greedy requests still "
        "give stage 13's tokens. Which test fails, and what happens to the sampling distribution?",
        "spec_verify.py",
        "    return chance < probs.gather(-1, guess[..., None])[..., 0]\n",
        "    return probs.argmax(dim=-1) == guess\n",
        (SPEC_SAMPLING + "test_rejection_sampling_keeps_the_target_distribution",),
    ),
    Exercise(
        "stage14_speculative", 2, BUILD, "give back the rejected guesses' pages",
        "ModelRunner.truncate_cache has lost its body. After a verify, free the pages past the "
        "request's first num_cached tokens (never below its shared prefix pages), and make sure the "
        "device page table sends those entries again.",
        "model_runner.py",
        "        keep = max(self.pages_for(request.num_cached), request.shared_pages)\n"
        "        if len(request.page_table) > keep:\n"
        "            self.allocator.free_pages(request.page_table[keep:])\n"
        "            del request.page_table[keep:]\n"
        "            request.pages_on_device = min(request.pages_on_device, keep)\n",
        '        raise NotImplementedError("exercise: free the pages past num_cached")\n',
        (SPECULATIVE + "test_an_abort_between_verifies_frees_the_target_and_draft_pages",
         SPECULATIVE + "test_stop_strings_and_max_tokens_are_never_overshot"),
    ),
    Exercise(
        "stage15_lora", 1, BREAK, "one cache for every adapter",
        "match_prefix now looks every prompt up under the base model's root, whatever its adapter. "
        "Which test fails, and what would a user serving two adapters see if inserts went there too?",
        "radix_cache.py",
        "        node, pages, i = self._root_for(namespace), [], 0\n",
        "        node, pages, i = self.root, [], 0\n",
        (LORA + "test_the_same_prompt_under_two_adapters_shares_no_cached_pages",),
    ),
    Exercise(
        "stage15_lora", 2, BUILD, "shrink and expand every slot at once",
        "add_dense has lost its body. Shrink x by every slot's A in one matmul (a is [slots, r, in]: "
        "view it as one matrix), keep each row's own slot's columns (rows.mask), and expand by every "
        "slot's B (b is [slots, r, out]) into out with one addmm.",
        "lora_layers.py",
        "    slots, rank, width = a.shape[0], a.shape[1], b.shape[2]\n"
        "    shrunk = F.linear(x, a.view(slots * rank, -1)) * rows.mask(rank, x.dtype)  # [T, slots x r]\n"
        "    return torch.addmm(out, shrunk, b.view(slots * rank, width))\n",
        '    raise NotImplementedError("exercise: out + B[slot] A[slot] x for every row, over all slots at once")\n',
        (LORA + "test_one_batch_of_every_adapter_and_the_base_equals_peft[dense]",),
    ),
    Exercise(
        "stage16_data_parallel", 1, BREAK, "a router that forgets where prompts went",
        "The router no longer records the prompts it sends. Every method still picks a live replica. "
        "Which test fails, and what happens to the replicas' prefix-cache hits on a shared-prefix workload?",
        "router.py",
        "        self.trees[replica].insert(prompt)\n",
        "",
        (ROUTER + "test_cache_aware_follows_the_prefix_and_balances_when_loads_part",),
    ),
    Exercise(
        "stage16_data_parallel", 2, BUILD, "the longest prefix sent before",
        "PromptTree.match has lost its body. Walk down the trie from the root, one token at a time, and "
        "return how many leading tokens of the prompt it holds.",
        "router.py",
        "        node, n = self.root, 0\n"
        "        for token in tokens:\n"
        "            node = node.children.get(token)\n"
        "            if node is None:\n"
        "                break\n"
        "            n += 1\n"
        "        return n\n",
        '        raise NotImplementedError("exercise: count the leading tokens the tree holds")\n',
        (ROUTER + "test_the_prompt_tree_matches_prefixes_and_forgets_the_least_recently_used",
         ROUTER + "test_cache_aware_follows_the_prefix_and_balances_when_loads_part"),
    ),
    Exercise(
        "stage17_hicache", 1, BREAK, "an eviction that copies nothing down",
        "Under write_back, evicting a device leaf no longer copies it to the host first. Every test of "
        "tokens still passes: which tests fail, and what does a returning conversation pay for it?",
        "hiradix_cache.py",
        '            if self.write_policy == "write_back":\n'
        "                self._back_up(node)\n",
        "",
        (HICACHE + "test_a_pool_too_small_for_the_prefixes_gives_the_same_tokens_and_prefills_fewer",
         HICACHE + "test_write_policies_copy_at_insert_on_eviction_or_after_two_hits"),
    ),
    Exercise(
        "stage17_hicache", 2, BUILD, "pages back into the device pool",
        "HiCacheController._scatter has lost its body. kv holds n pages in the host layout [n, 2, layers, "
        "page_size, heads, dim], already on the device; put page i's keys and values into the slots of "
        "pages[i] in the device pool, whose layout is [layers, slots, heads, dim] (self.slots gives the slots).",
        "cache_controller.py",
        "        slots = self.slots(pages, self.device)\n"
        "        kv = kv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # [2, L, n * ps, H, D]\n"
        "        self.device_pool.k[:, slots], self.device_pool.v[:, slots] = kv[0], kv[1]\n",
        '        raise NotImplementedError("exercise: scatter the loaded pages into the device pool")\n',
        (HICACHE + "test_a_prefix_goes_to_host_then_to_disk_and_comes_back_the_same",
         HICACHE + "test_aborting_a_request_whose_prefix_is_loading_frees_every_tier"),
    ),
    Exercise(
        "stage18_pd_disaggregation", 1, BREAK, "a failed handover that keeps its pages",
        "When a handover fails (no K/V in time, or an abort), the decode engine no longer frees the pages "
        "it reserved. The requests still end. Which tests fail, and what happens to a decode engine after "
        "a few hundred such failures?",
        "disaggregation.py",
        "        if request.page_table or request.table_row is not None:\n"
        "            self.runner.free_cache(request)\n",
        "",
        (HANDOVER + "test_no_kv_within_the_timeout_ends_the_request_with_an_error",
         HANDOVER + "test_aborts_on_the_decode_side_leak_nothing"),
    ),
    Exercise(
        "stage18_pd_disaggregation", 2, BUILD, "the K/V into the reserved pages",
        "DecodeRole._place no longer writes what arrived into the pool. kv holds the prompt's keys and "
        "values, already on the pool's device, as [2, layers, pages * page_size, heads, dim]; write them "
        "into the slots of the request's reserved pages (pool_slots gives them) of runner.pool.k and "
        "runner.pool.v.",
        "disaggregation.py",
        "        slots = pool_slots(request.page_table, runner.page_size, runner.pool.k.device)\n"
        "        runner.pool.k[:, slots], runner.pool.v[:, slots] = kv[0], kv[1]\n",
        '        raise NotImplementedError("exercise: place the received K/V in the reserved pages")\n',
        (HANDOVER + "test_the_decode_engine_gives_stage17s_tokens",),
    ),
    Exercise(
        "stage19_pipeline_parallel", 1, BREAK, "one micro-batch at a time",
        "Rank 0 now samples each micro-batch as soon as it has sent it, whatever pp_async_batch_depth says. "
        "Every token is still right. Which test fails, and what does the timeline it reads show? Draw the "
        "two ranks' forwards over time, before and after.",
        "engine.py",
        "        if self.micro_batches and (len(self.micro_batches) >= self.pp_depth or not batch):\n",
        "        if self.micro_batches:\n",
        (PIPELINE + "test_two_micro_batches_in_flight_keep_both_ranks_busy_at_once",),
    ),
    Exercise(
        "stage19_pipeline_parallel", 2, BUILD, "only this rank's layers",
        "PipelineShard.run no longer runs anything. Write this rank's part of the forward: the first rank "
        "embeds input_ids (model.model.embed_tokens), a later one starts from hidden; take the rotary cos and "
        "sin for positions (model.model.rotary_cos_sin), run the layers in self.layers, and on the last rank "
        "apply the final norm (model.model.norm).",
        "pipeline.py",
        "        inner = model.model\n"
        "        x = inner.embed_tokens(input_ids) if self.first else hidden\n"
        "        cos, sin = inner.rotary_cos_sin(positions, x.dtype)\n"
        "        for index in self.layers:\n"
        "            x = inner.layers[index](x, cos, sin, attention)\n"
        "        return inner.norm(x) if self.last else x\n",
        '        raise NotImplementedError("exercise: run this pipeline rank\'s layers")\n',
        (PIPELINE + "test_pp2_gives_one_ranks_tokens_with_chunks_and_prefix_hits[dense]",),
    ),
    Exercise(
        "lang", 1, BREAK, "forks that take turns",
        "A fork's branches now run their pieces one branch after another. Every branch still gets "
        "its text; which test notices, and what does the engine lose when n requests arrive one by one "
        "instead of as one batch (think of stage 06's in-batch prefix sharing)?",
        "state.py",
        "    def __iadd__(self, piece):\n        run(list(self), piece)\n        return self\n",
        "    def __iadd__(self, piece):\n        for branch in self:\n            run([branch], piece)\n        return self\n",
        (LANG + "test_a_forks_gen_goes_to_the_engine_in_one_call",),
    ),
    Exercise(
        "lang", 2, BUILD, "where a choice's tokens start",
        "score_inputs has lost its body. Tokenize each prompt + continuation and find the first token "
        "that differs from the prompt's own (a continuation may merge with the prompt's last token): "
        "select scores the tokens from there on, at least the last one.",
        "backend.py",
        "    base = tokenizer.encode(prompt)\n    ids, starts = [], []\n    for continuation in continuations:\n"
        "        full = tokenizer.encode(prompt + continuation)\n"
        "        shared = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), min(len(base), len(full)))\n"
        "        ids.append(full)\n        starts.append(min(shared, len(full) - 1))\n    return ids, starts\n",
        '    raise NotImplementedError("exercise: each prompt + continuation as ids, and where the continuation starts")\n',
        (LANG + "test_select_picks_the_highest_normalized_likelihood_computed_by_transformers",),
    ),
]


def exercises_of(stage: str) -> list[Exercise]:
    return [e for e in EXERCISES if e.stage == stage]


def find(stage: str, number: int) -> Exercise:
    for exercise in EXERCISES:
        if exercise.stage == stage and exercise.number == number:
            return exercise
    known = ", ".join(f"{e.stage} {e.number}" for e in EXERCISES)
    raise ValueError(f"no exercise {stage} {number}; there are: {known}")
