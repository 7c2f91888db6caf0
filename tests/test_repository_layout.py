"""README "Repository layout": every file it names exists and every module of machinery/ is
named; every name in its table of concepts is defined in the script (and, for Utils, the
section) or the machinery/ module the table says; no source file is over 800 lines; the
drivers import from the modules, never from each other, no module imports a driver, and
the imports have no cycle."""
import ast
import glob
import importlib
import os
import re

import pytest

from conftest import REPO

SCRIPTS = ('Train', 'Test', 'Options', 'Pipeline', 'Networks', 'Utils')


def layout_section():
    with open(os.path.join(REPO, 'README.md')) as f:
        return f.read().split('\n## Repository layout\n', 1)[1].split('\n## ', 1)[0]


def concept_rows():
    """(concept, [(script, section or None, [names])]) for each row of the table."""
    rows = []
    for line in layout_section().splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if len(cells) != 2 or cells[0] in ('concept', '---'):
            continue
        places = []
        for part in re.split(r';\s*', cells[1]):
            script = re.match(r'([\w/]+)', part).group(1)
            section = re.search(r'§(\d)', part)
            names = re.findall(r'`(\w+)', re.sub(r'\(its .*?\)', '', part))  # (methods)
            places.append((script, section and int(section.group(1)), names))
        rows.append((cells[0], places))
    return rows


def test_the_layout_names_the_files_that_exist():
    block = layout_section().split('```')[1]
    for entry in re.findall(r'^(\S+)', block, re.MULTILINE):
        assert os.path.exists(os.path.join(REPO, entry)), entry
    for script in SCRIPTS:
        assert f'pix2pixCC_{script}.py' in block
    listed = re.findall(r'^ {4}(\w+\.py) ', block, re.MULTILINE)  # under machinery/
    modules = sorted(name for name in os.listdir(os.path.join(REPO, 'machinery'))
                     if name.endswith('.py') and name != '__init__.py')
    assert sorted(listed) == modules


def module_of(script):
    """The module a row's place names: `Utils` is pix2pixCC_Utils, `machinery/files` is
    machinery.files."""
    if script.startswith('machinery/'):
        return importlib.import_module(script.replace('/', '.'))
    assert script in SCRIPTS, script
    return importlib.import_module(f'pix2pixCC_{script}')


def utils_section_of(name):
    """The number of the Utils section (`# N. title` banner) in which `name` is defined."""
    with open(os.path.join(REPO, 'pix2pixCC_Utils.py')) as f:
        text = f.read()
    section = None
    for line in text.splitlines():
        banner = re.match(r'# (\d)\. ', line)
        if banner:
            section = int(banner.group(1))
        if re.match(rf'(def|class) {name}\b|{name} = ', line):
            return section
    return None


@pytest.mark.parametrize('concept, places', concept_rows(), ids=lambda v: str(v)[:40])
def test_every_concept_lives_where_the_layout_says(concept, places):
    assert places and any(names for _, _, names in places), concept
    for script, section, names in places:
        module = module_of(script)
        for name in names:
            assert hasattr(module, name), (concept, script, name)
            # defined there, not only imported (constants have no __module__)
            defined_in = getattr(getattr(module, name), '__module__', module.__name__)
            assert defined_in == module.__name__, (concept, script, name, defined_in)
            if section is not None:
                assert utils_section_of(name) == section, (concept, name, section)


DRIVERS = ('pix2pixCC_Train', 'pix2pixCC_Test')
LONGEST = 800  # lines of a source file (tests/ aside): one concern a module


def source_files():
    """The repository's Python files outside tests/ (and its virtual environments)."""
    return [path for path in glob.glob(os.path.join(REPO, '**', '*.py'), recursive=True)
            if os.path.relpath(path, REPO).split(os.sep)[0] not in ('tests', '.venv', 'venv')]


def test_no_source_file_is_longer_than_a_few_screens():
    long = {os.path.relpath(path, REPO): n for path in source_files()
            if (n := sum(1 for _ in open(path))) > LONGEST}
    assert not long, long


def local_imports(path):
    """The repository's modules (pix2pixCC_*, machinery.*) that the file at `path` imports."""
    imported = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.ImportFrom) and node.module == 'machinery':
            names = [f'machinery.{alias.name}' for alias in node.names]
        imported |= {name for name in names
                     if name.startswith(('pix2pixCC_', 'machinery.'))}
    return imported


def module_graph():
    """{module: the repository modules it imports} of the six scripts and machinery/."""
    paths = glob.glob(os.path.join(REPO, 'pix2pixCC_*.py')) + \
        glob.glob(os.path.join(REPO, 'machinery', '*.py'))
    return {os.path.relpath(path, REPO)[:-3].replace(os.sep, '.').replace('.__init__', ''):
            local_imports(path) for path in paths}


def test_no_module_imports_a_driver_and_the_imports_have_no_cycle():
    graph = module_graph()
    for module, imported in graph.items():
        assert not imported & set(DRIVERS), (module, imported & set(DRIVERS))
    done, path = set(), []

    def visit(module):  # depth first: a module met again on the current path is a cycle
        assert module not in path, ' -> '.join(path + [module])
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_deploy_imports_only_the_torch_free_modules():
    """deploy/onnx_translate.py runs without torch: what it imports of the repository
    imports no torch either (its test runs it with torch blocked)."""
    imported = local_imports(os.path.join(REPO, 'deploy', 'onnx_translate.py'))
    assert imported and imported <= {'machinery.products', 'machinery.data_profile',
                                     'pix2pixCC_Options'}, imported
    for module in ('products', 'data_profile'):
        assert not local_imports(os.path.join(REPO, 'machinery', f'{module}.py')) - \
            {'pix2pixCC_Options'}, module
