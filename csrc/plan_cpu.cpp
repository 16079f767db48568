// The CPU's CUDA graph: a recorded sequence of dispatcher calls, replayed from C++ without Python.
//
// torch.classes.fuselm.Plan: runtime/graphs.py records every operator a decode step dispatches
// (fuselm's and aten's alike) with its arguments and the tensors it returned; `run()` calls each
// operator again, boxed, on the same argument tensors, and writes each result into the tensor the
// recording returned, so later entries (which hold those tensors) read the new values. Views cost
// nothing and are not recorded: they alias recorded storage. Like a CUDA graph, a plan is valid
// while shapes, storages and host-side decisions stay as they were recorded.
//
// Where a fuselm operator has an out= form taking the same arguments plus its results (`qlinear.out`,
// `rms_norm.residual_out`: the same code writing into given tensors), the entry calls that with the
// recorded results: nothing is allocated or copied. Else the result is copied into the recorded
// tensor. (Not aten's out= forms: `linear.out` rounds a bf16 bias add differently from `linear`.) A replayed entry costs its kernel plus ~0.2 us; the decode step's Python ran ~10 us per
// operator.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace fuselm {
namespace {

struct Plan : torch::CustomClassHolder {
  struct Entry {
    c10::OperatorHandle op;
    std::vector<c10::IValue> args;
    std::vector<at::Tensor> outs;  // the recorded results, in the operator's return order
  };
  std::vector<Entry> entries;
  torch::jit::Stack stack;

  // args: every argument of the schema in order (defaults filled in by the recorder).
  void add(const std::string& name, const std::string& overload, std::vector<c10::IValue> args,
           std::vector<at::Tensor> outs) {
    const auto handle = c10::Dispatcher::singleton().findSchema({name, overload});
    TORCH_CHECK(handle.has_value(), "fuselm Plan: no operator ", name, ".", overload);
    const auto& schema = handle->schema();
    TORCH_CHECK(args.size() == schema.arguments().size(), "fuselm Plan: ", name, " takes ",
                schema.arguments().size(), " arguments, got ", args.size());
    for (size_t i = 0; i < args.size(); ++i) {
      // Python's lists of tensors arrive as Tensor[]; Tensor?[] arguments (index, index_put_) need the other list type
      const auto& type = schema.arguments()[i].type();
      if (args[i].isTensorList() && type->kind() == c10::TypeKind::ListType &&
          type->castRaw<c10::ListType>()->getElementType()->kind() == c10::TypeKind::OptionalType) {
        c10::List<std::optional<at::Tensor>> list;
        for (const at::Tensor& t : args[i].toTensorList()) list.push_back(t);
        args[i] = list;
      }
    }
    // out= form: the same arguments, then one mutable Tensor per recorded result
    const auto out_form = name.rfind("fuselm::", 0) == 0
                              ? c10::Dispatcher::singleton().findSchema({name, overload.empty() ? "out" : overload + "_out"})
                              : std::nullopt;
    if (out_form.has_value() && !outs.empty()) {
      const auto& a = out_form->schema().arguments();
      bool fits = a.size() == args.size() + outs.size();
      for (size_t i = 0; fits && i < a.size(); ++i)
        fits = i < args.size() ? a[i].type()->kind() == schema.arguments()[i].type()->kind()
                               : a[i].alias_info() != nullptr && a[i].alias_info()->isWrite();
      if (fits) {
        for (const at::Tensor& o : outs) args.emplace_back(o);
        entries.push_back({*out_form, std::move(args), {}});
        return;
      }
    }
    entries.push_back({*handle, std::move(args), std::move(outs)});
  }

  void run() {
    for (Entry& e : entries) replay(e);
  }

  // One run, timing each entry: seconds per entry (bench/e2e.py splits a step into matmuls and the rest).
  std::vector<double> profile() {
    std::vector<double> seconds;
    seconds.reserve(entries.size());
    for (Entry& e : entries) {
      const auto t0 = std::chrono::steady_clock::now();
      replay(e);
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return seconds;
  }

  void replay(Entry& e) {
    stack.assign(e.args.begin(), e.args.end());
    e.op.callBoxed(&stack);
    for (size_t i = 0; i < e.outs.size() && i < stack.size(); ++i) {
      if (!stack[i].isTensor()) continue;
      const at::Tensor r = stack[i].toTensor();
      at::Tensor& o = e.outs[i];
      if (r.is_same(o)) continue;  // in-place operators return their argument
      if (r.is_contiguous() && o.is_contiguous() && r.dtype() == o.dtype() && r.numel() == o.numel())
        std::memcpy(o.data_ptr(), r.const_data_ptr(), r.nbytes());
      else
        o.copy_(r);
    }
    stack.clear();
  }

  int64_t size() const { return static_cast<int64_t>(entries.size()); }

  // "name.overload" of entry i, for logs and tests
  std::string entry(int64_t i) const {
    TORCH_CHECK(i >= 0 && i < size(), "fuselm Plan: entry ", i, " of ", size());
    const auto& n = entries[i].op.operator_name();
    return n.overload_name.empty() ? n.name : n.name + "." + n.overload_name;
  }
};

}  // namespace
}  // namespace fuselm

TORCH_LIBRARY_FRAGMENT(fuselm, m) {
  m.class_<fuselm::Plan>("Plan")
      .def(torch::init<>())
      .def("add", &fuselm::Plan::add)
      .def("run", &fuselm::Plan::run)
      .def("profile", &fuselm::Plan::profile)
      .def("size", &fuselm::Plan::size)
      .def("entry", &fuselm::Plan::entry);
}
