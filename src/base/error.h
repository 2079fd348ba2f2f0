// Errors: the library throws kvq::Error with a one-line message that names the
// problem (and the file, where there is one). Tools catch it at the top and print
// "kvq: error: <message>" with a non-zero exit. Library code never calls exit().
#pragma once
#include <fmt/format.h>

#include <string>

#include "kvq/error.h"

namespace kvq {

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace kvq

// Internal invariant (a bug if it fires), kept in release builds: cheap checks only.
#define KVQ_ASSERT(cond)                                                                  \
  do {                                                                                    \
    if (!(cond)) ::kvq::fail("internal error: {}:{}: assertion '{}' failed", __FILE__, __LINE__, #cond); \
  } while (0)
