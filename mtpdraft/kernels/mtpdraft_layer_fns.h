// The kernels a decoder layer calls: mtpdraft_kernels hands their addresses to
// mtpdraft_qkernels' one-call layer stack and drafting step in a capsule (layer_fns). Both builds include this
// header (its bytes are part of their cache keys); `size` guards against mixing builds.
#pragma once
#include <torch/extension.h>

struct LayerFns {
  int64_t size;
  torch::Tensor (*rmsnorm)(torch::Tensor, torch::Tensor, double, double);
  std::vector<torch::Tensor> (*add_rmsnorm)(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                                            c10::optional<torch::Tensor>, double, double);
  torch::Tensor (*gated_act)(torch::Tensor, int64_t);
  torch::Tensor (*qkv_rope_cache)(torch::Tensor, torch::Tensor, int64_t, int64_t, c10::optional<torch::Tensor>,
                                  c10::optional<torch::Tensor>, double, double, torch::Tensor, torch::Tensor,
                                  torch::Tensor, int64_t, bool);
  torch::Tensor (*attention)(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, double, double);
  torch::Tensor (*linear)(torch::Tensor, torch::Tensor);                  // dense fp32/bf16 weights
  torch::Tensor (*linear_packed)(torch::Tensor, torch::Tensor, int64_t);  // pack_weight's layout, O rows
};
