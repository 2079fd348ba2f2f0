// The one exception type kvq throws: a one-line message naming the problem.
#pragma once
#include <stdexcept>

namespace kvq {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace kvq
