// Python bindings of omnifast's C++ CPU kernels (module omnifast._C).
#include <torch/extension.h>

#include "ctc.h"
#include "fsq.h"
#include "moe.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "omnifast C++ CPU kernels";
  m.def("ctc_nll_and_grad", &omnifast::ctc_nll_and_grad, py::arg("inputs"), py::arg("targets"),
        py::arg("input_lengths"), py::arg("target_lengths"), py::arg("blank"),
        py::arg("zero_infinity"), py::arg("grad_scale"), py::arg("from_logits"),
        "CTC negative log-likelihood per sequence and its scaled gradient (None: no gradient)");
  m.def("ctc_states", &omnifast::ctc_states, py::arg("emissions"), py::arg("targets"),
        py::arg("input_lengths"), py::arg("target_lengths"), py::arg("blank"), py::arg("want_occupancy"),
        "log p(y|x) from state emissions; occupancies written over the emissions");
  m.def("chunk_emissions", &omnifast::chunk_emissions, py::arg("logits"), py::arg("t0"),
        py::arg("input_lengths"), py::arg("exts"), py::arg("target_lengths"), py::arg("emissions"),
        "row log-sum-exp of a logits chunk and the state emissions of each target set");
  m.def("chunk_grad", &omnifast::chunk_grad, py::arg("logits"), py::arg("lse"), py::arg("t0"),
        py::arg("input_lengths"), py::arg("softmax_coef"), py::arg("exts"), py::arg("target_lengths"),
        py::arg("occupancies"), py::arg("coefs"), py::arg("poison"),
        "overwrite a logits chunk with softmax * coef - sum_k coef_k * occupancy_k");
  m.def("moe_route", &omnifast::moe_route, py::arg("logits"), py::arg("top_k"), py::arg("normalize"),
        "top-k routing from float32 gate logits: probs, weights, experts, lse, counts, offsets, order, position");
  m.def("moe_unpermute", &omnifast::moe_unpermute, py::arg("y"), py::arg("position"), py::arg("weights"),
        py::arg("top_k"), "weighted combine of each token's top_k expert rows, by gather");
  m.def("moe_unpermute_backward", &omnifast::moe_unpermute_backward, py::arg("grad_out"), py::arg("y"),
        py::arg("position"), py::arg("weights"), py::arg("top_k"), py::arg("want_weight_grad"),
        "gradients of moe_unpermute w.r.t. the expert rows and the weights");
  m.def("fsq_forward", &omnifast::fsq_forward, py::arg("z"), py::arg("half_level"), py::arg("offset"),
        py::arg("shift"), py::arg("half_width"), py::arg("basis"), "finite scalar quantisation: codes and indices");
  m.def("fsq_backward", &omnifast::fsq_backward, py::arg("grad_codes"), py::arg("z"), py::arg("half_level"),
        py::arg("shift"), py::arg("half_width"), "straight-through gradient of fsq_forward");
}
