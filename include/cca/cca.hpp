// Umbrella header of the cca library.
#pragma once
#include "cca/attention.hpp"
#include "cca/error.hpp"
#include "cca/kv_cache.hpp"
#include "cca/tensor.hpp"
#include "cca/variant.hpp"
